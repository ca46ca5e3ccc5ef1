"""
Decision regions on the 2-D toy stream: DKVB vs a linear probe
==============================================================

The DKVB paper's smallest experiment: eight Gaussian classes on a 3x3 grid
without its centre, learned as four tasks of two opposite classes each
(``{0, 4}``, ``{1, 5}``, ``{2, 6}``, ``{3, 7}``). Each task is one
``partial_fit`` call and no task boundary is announced.

A linear probe (logistic regression by SGD) rewrites its whole decision
function on each task and forgets the earlier classes. DKVB only changes the
values of keys the current task's points select, so the regions it learned
earlier stay where they were.

The keys come from *unlabeled* points spread over the input square: the
bottleneck needs keys wherever future classes may live, before any label is
seen (see the user guide).
"""

# %%
# Data and stream
# ---------------
import numpy as np

from skdkvb import DKVBClassifier
from skdkvb.continual import class_incremental_split
from skdkvb.continual.baselines import make_linear_probe
from skdkvb.continual.datasets import TOY_2D_CLASS_ORDER, make_toy_2d
from skdkvb.continual.plotting import plot_decision_regions

X, y = make_toy_2d(n_samples_per_class=100, random_state=0)
X_test, y_test = make_toy_2d(n_samples_per_class=100, random_state=1)  # held out, for the scores
stream = class_incremental_split(X, y, n_tasks=4, class_order=list(TOY_2D_CLASS_ORDER), random_state=0)
print("tasks:", [t.tolist() for t in stream.task_classes])

# Unlabeled data of the domain: uniform points over the plotting square.
rng = np.random.RandomState(0)
X_unlabeled = rng.uniform(-0.25, 1.25, size=(4000, 2)).astype(np.float32)

# %%
# Train both models task by task
# ------------------------------
# ``n_heads`` random 2-D projections of the plane, each cut into ``n_keys``
# cells by its keys. Snapshots of ``predict`` are kept after every task.
import copy

dkvb = DKVBClassifier(
    n_heads=64,
    n_keys=64,
    key_dim=2,
    learning_rate=0.3,
    partial_fit_epochs=20,
    batch_size=32,
    random_state=0,
    device="cpu",
).fit_keys(X_unlabeled)
probe = make_linear_probe(random_state=0, max_iter=20)

snapshots = {"DKVB": [], "linear probe": []}
accuracy = {"DKVB": [], "linear probe": []}
seen = []
for X_task, y_task in stream:
    dkvb.partial_fit(X_task, y_task)
    for _ in range(20):
        probe.partial_fit(X_task, y_task, classes=np.arange(8))
    seen.extend(np.unique(y_task).tolist())
    mask = np.isin(y_test, seen)
    for name, model in (("DKVB", dkvb), ("linear probe", probe)):
        frozen = copy.deepcopy(model)
        snapshots[name].append(frozen.predict)
        accuracy[name].append(frozen.score(X_test[mask], y_test[mask]))

for name, acc in accuracy.items():
    print(
        f"{name:>12}: held-out accuracy on the classes seen so far, after tasks 1-4: "
        + "  ".join(f"{a:.2f}" for a in acc)
    )

# %%
# Decision regions after each task
# --------------------------------
# Top row: DKVB keeps the regions of earlier tasks. Bottom row: the linear
# probe only predicts the two most recent classes.
fig = plot_decision_regions(snapshots, X, y, resolution=120)
fig.suptitle("Class-incremental 2-D toy stream")

# %%
# DKVB's final held-out accuracy on all eight classes stays high while the probe's is
# close to ``2 / 8``: the probe has forgotten everything but the last task.
assert accuracy["DKVB"][-1] > accuracy["linear probe"][-1]
