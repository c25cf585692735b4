"""One module per model family that has its own assembly and loop."""
