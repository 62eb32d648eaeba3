"""Export and engine-build stages: one module per stage, each a pure function plus a thin CLI."""
