#!/usr/bin/env bash
# The main job on the embedded tiny model: generate it, then answer a question about the bundled clip.
source "$(dirname "$0")/env.sh"
OUT="${1:-$ROOT/out/tiny-engine}"
af3trt run --model tiny --audio af3trt/assets/speech.wav --prompt "Transcribe the input speech." --json
