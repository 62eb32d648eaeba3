"""Bundled assets: a short espeak-ng speech clip for the demo and tests."""

from pathlib import Path

ASSETS = Path(__file__).resolve().parent
SPEECH_WAV = ASSETS / "speech.wav"  # 5.78 s, 16 kHz mono, see README.md for the text
SPEECH_TEXT = "Hello from Audio Flamingo three. The quick brown fox jumps over the lazy dog."
