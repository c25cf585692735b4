"""Image upscalers: A1111's built-in ones (None, Lanczos, Nearest) and model files read by spandrel, run tiled on the
engine's device, and the Extras tab's job over them (resize by or to, two upscalers blended).

``found`` lists what exists, ``model`` loads and runs a model file, ``tiles`` is the tiled run, ``extras`` the job,
``request`` A1111's Extras request bodies.
"""
