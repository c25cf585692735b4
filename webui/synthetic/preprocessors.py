"""ControlNet preprocessors' weight files with random values, in the layouts lllyasviel/Annotators ships and
controlnet_aux reads (the classes are controlnet_aux's own, so the shapes are the real ones): the tests' files."""
from __future__ import annotations

from pathlib import Path

import torch


def _networks() -> dict:
    """Each detector's files: name -> (the network's class, how its state dict is saved)."""
    from controlnet_aux.hed import ControlNetHED_Apache2
    from controlnet_aux.lineart import Generator
    from controlnet_aux.mlsd.models.mbv2_mlsd_large import MobileV2_MLSD_Large
    from controlnet_aux.pidi.model import pidinet

    def lineart() -> torch.nn.Module:
        return Generator(3, 1, 3)

    return {
        "ControlNetHED.pth": (ControlNetHED_Apache2, lambda state: state),
        "table5_pidinet.pth": (pidinet, lambda state: {"state_dict": {f"module.{k}": v for k, v in state.items()}}),
        "sk_model.pth": (lineart, lambda state: state),
        "sk_model2.pth": (lineart, lambda state: state),
        "mlsd_large_512_fp32.pth": (MobileV2_MLSD_Large, lambda state: state),
    }


def write_preprocessor_weights(path: Path, seed: int = 0) -> Path:
    """The file ``path.name`` (one of lllyasviel/Annotators' names above), made at ``path`` with random weights."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        network, layout = _networks()[path.name]
    with torch.random.fork_rng(devices=[]):  # the caller's random numbers stay as they were
        torch.manual_seed(seed)
        model = network()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(layout(model.state_dict()), path)
    return path
