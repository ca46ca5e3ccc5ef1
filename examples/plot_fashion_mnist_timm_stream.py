"""
Class-incremental Fashion-MNIST through a frozen timm backbone
==============================================================

DKVB is meant to sit on a *frozen, pre-trained* encoder. This example embeds
Fashion-MNIST images with a timm backbone whose weights come from a local
checkpoint file, then learns the ten classes as five tasks of two classes,
one ``partial_fit`` call per task, without telling the model where tasks end.
A linear probe on the same embeddings is the baseline.

.. warning::

   **The weights are random unless you provide a real checkpoint.** No
   network is used: when ``CHECKPOINT_PATH`` below is ``None`` (and the
   environment variable ``SKDKVB_CHECKPOINT`` is unset), the script saves a
   randomly initialised ``resnet10t`` to a temporary ``.safetensors`` file and
   loads it back, so that the code path is the one you would use with real
   weights. Random features are much weaker than pre-trained ones, so treat
   the numbers as a smoke test. To use real weights, download the
   ``model.safetensors`` of the Hugging Face repository
   ``timm/resnet10t.c3_in1k`` on a machine with network access and point
   ``CHECKPOINT_PATH`` (or ``SKDKVB_CHECKPOINT``) at it.

The images (28x28, grey) are repeated to three channels and resized to
``IMAGE_SIZE`` pixels by the embedder's batched preprocessing; with real
ImageNet weights the model's own resolution (176 pixels for ``resnet10t``)
gives better features, at about thirty times the cost. The script runs in well under a minute on a laptop CPU.
"""

# %%
# Where the weights come from
# ---------------------------
import os
import tempfile
import time

import numpy as np
import timm
import torch
from safetensors.torch import save_file

MODEL_NAME = "resnet10t"
# Put the path of a real checkpoint here, e.g. "~/weights/resnet10t.c3_in1k.safetensors"
# (any timm architecture works: change MODEL_NAME to match the file).
CHECKPOINT_PATH = os.environ.get("SKDKVB_CHECKPOINT")
IMAGE_SIZE = 32
N_TRAIN, N_TEST = 2000, 1000

if CHECKPOINT_PATH is None:
    print("No checkpoint given: using RANDOM weights (see the warning above).")
    torch.manual_seed(0)
    stand_in = timm.create_model(MODEL_NAME, pretrained=False, num_classes=0)
    CHECKPOINT_PATH = os.path.join(tempfile.mkdtemp(), f"{MODEL_NAME}-random.safetensors")
    save_file(stand_in.state_dict(), CHECKPOINT_PATH)
else:
    CHECKPOINT_PATH = os.path.expanduser(CHECKPOINT_PATH)
print("checkpoint:", CHECKPOINT_PATH)

# %%
# Fashion-MNIST as uint8 images
# -----------------------------
# ``load_fashion_mnist`` reads the IDX files of the Debian package
# ``dataset-fashion-mnist``. Images are given to the embedder as uint8
# channels-last arrays ``(N, H, W, C)``; one grey channel is repeated to three.
from skdkvb.continual.datasets import load_fashion_mnist

data = load_fashion_mnist(n_train=N_TRAIN, n_test=N_TEST, random_state=0)
X_train = data.X_train.reshape(-1, 28, 28, 1).astype(np.uint8)
X_test = data.X_test.reshape(-1, 28, 28, 1).astype(np.uint8)
y_train, y_test = data.y_train, data.y_test
print(X_train.shape, X_train.dtype)

# %%
# Embed once with the frozen backbone
# -----------------------------------
# :class:`~skdkvb.encoders.TimmEmbedder` builds the model headless
# (``num_classes=0``), loads the checkpoint, and embeds in batches under
# ``torch.inference_mode``. Embedding once and streaming the embeddings is the
# cheapest way to run several learners over the same stream.
from skdkvb.encoders import TimmEmbedder

embedder = TimmEmbedder(
    MODEL_NAME,
    checkpoint_path=CHECKPOINT_PATH,
    data_config={"input_size": (3, IMAGE_SIZE, IMAGE_SIZE)},
    batch_size=250,
    device="auto",
)
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
# The keys of DKVB are initialised on a held-out share of the training
# embeddings without labels; then each task is one ``partial_fit`` call.
from skdkvb import DKVBClassifier
from skdkvb.continual import class_incremental_split, evaluate_stream, unlabeled_split
from skdkvb.continual.baselines import make_linear_probe

Z_unlabeled, Z_stream, y_stream = unlabeled_split(Z_train, y_train, unlabeled_size=0.2)
stream = class_incremental_split(Z_stream, y_stream, n_tasks=5, random_state=0)
print("tasks:", [t.tolist() for t in stream.task_classes])

dkvb = DKVBClassifier(n_heads=64, n_keys=256, key_dim=8, partial_fit_epochs=5, device="auto", random_state=0)
reports = [
    evaluate_stream(dkvb, stream, Z_test, y_test, X_unlabeled=Z_unlabeled, name="DKVB"),
    evaluate_stream(make_linear_probe(random_state=0), stream, Z_test, y_test, name="linear probe"),
]
for report in reports:
    print(f"{report.name:>12}: average accuracy {report.average_accuracy:.3f}, forgetting {report.forgetting:.3f}")

# %%
# Accuracy on the classes seen so far
# -----------------------------------
# The linear probe forgets old classes as new ones arrive; DKVB's local value
# updates keep them.
from skdkvb.continual.plotting import plot_average_accuracy

fig = plot_average_accuracy(reports)
fig.suptitle(f"Fashion-MNIST, {MODEL_NAME} features (random unless a checkpoint is given)")

# %%
# The same stream from raw images, as one estimator
# -------------------------------------------------
# :func:`~skdkvb.pipeline.make_streaming_pipeline` gives a pipeline with
# ``partial_fit``: the frozen embedder only transforms (it is fitted once, here
# explicitly, so that DKVB's keys can be initialised on unlabeled embeddings
# first), and DKVB is updated per batch. Equivalently,
# ``DKVBClassifier(encoder=MODEL_NAME, encoder_kwargs={"checkpoint_path": ...})``
# embeds inside the classifier. Only the first two tasks, to keep it fast.
from skdkvb.pipeline import make_streaming_pipeline

pipe = make_streaming_pipeline(
    TimmEmbedder(
        MODEL_NAME,
        checkpoint_path=CHECKPOINT_PATH,
        data_config={"input_size": (3, IMAGE_SIZE, IMAGE_SIZE)},
        batch_size=250,
    ),
    DKVBClassifier(n_heads=64, n_keys=256, key_dim=8, partial_fit_epochs=5, random_state=0),
)
embed_step, dkvb_step = pipe[0], pipe[-1]
X_unlabeled = X_train[:400]
dkvb_step.fit_keys(embed_step.fit(X_unlabeled).transform(X_unlabeled))

seen = []
for classes in stream.task_classes[:2]:
    mask = np.isin(y_train, classes)
    pipe.partial_fit(X_train[mask], y_train[mask])
    seen.extend(int(c) for c in classes)
    test_mask = np.isin(y_test, seen)
    print(f"classes {sorted(seen)}: accuracy {pipe.score(X_test[test_mask], y_test[test_mask]):.3f}")
