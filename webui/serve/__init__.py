"""Several GPUs and hosts on Ray Serve (``--workers N``, ``--ray-address``): one unchanged engine per replica, each
owning its GPU, and this process as the ingress — the UI, the API, the queue, the settings, saving images and one
``/progress`` over them all. Nothing here is imported without those flags."""
