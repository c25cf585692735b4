"""The demo model: its world of captioned shapes (``shapes``), its training (``train``, run on a GPU) and the
files the app ships (``package``)."""
