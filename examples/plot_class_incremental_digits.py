"""
Class-incremental digits: DKVB against a linear probe and Streaming LDA
=======================================================================

The 8x8 digits arrive in five tasks of two classes each, in a shuffled class
order, with no task boundaries given to the learners. After every task each
learner is scored on the test images of all tasks, which fills an accuracy
matrix ``R[t, j]`` (tasks numbered from 1; cells of tasks not yet seen stay
blank) on held-out test images. A linear probe trained by SGD forgets old classes as soon
as new ones arrive; the Discrete Key-Value Bottleneck (DKVB) keeps them,
because each sample only updates the values of the keys it selects.
"""

# %%
# Data: standardised pixels, and a class-incremental stream
# ---------------------------------------------------------
from sklearn.preprocessing import StandardScaler

from skdkvb import DKVBClassifier
from skdkvb.continual import class_incremental_split, evaluate_stream, summarize
from skdkvb.continual.baselines import StreamingLDA, make_linear_probe
from skdkvb.continual.datasets import load_digits_split
from skdkvb.continual.plotting import plot_accuracy_matrices, plot_average_accuracy

data = load_digits_split()
scaler = StandardScaler().fit(data.X_train)
X_train, X_test = scaler.transform(data.X_train), scaler.transform(data.X_test)
stream = class_incremental_split(X_train, data.y_train, n_tasks=5, random_state=0)
print("tasks:", [t.tolist() for t in stream.task_classes])

# %%
# Three learners on the same stream
# ---------------------------------
# DKVB's keys are fitted on the training inputs without labels before the
# stream starts (``X_unlabeled``); the ``logp`` decoder learns in one pass.
dkvb = DKVBClassifier(
    n_heads=64,
    n_keys=256,
    key_dim=14,
    decoder="logp",
    temperature=16.0,
    key_init_epochs=2,
    key_init_batch_size=64,
    device="cpu",
    random_state=0,
)
reports = [
    evaluate_stream(dkvb, stream, X_test, data.y_test, X_unlabeled=X_train, name="DKVB"),
    evaluate_stream(make_linear_probe(random_state=0), stream, X_test, data.y_test, epochs=5, name="linear probe"),
    evaluate_stream(StreamingLDA(), stream, X_test, data.y_test, name="SLDA"),
]
for row in summarize(reports):
    print(
        f"{row['method']:>13}: held-out accuracy {row['average_accuracy_mean']:.3f}, "
        f"forgetting {row['forgetting_mean']:.3f}"
    )

# %%
# Accuracy matrices and accuracy on the tasks seen so far
# --------------------------------------------------------
# Rows are training steps, columns the tasks evaluated. The linear probe's
# matrix is bright only on the diagonal: every new task erases the previous ones.
plot_accuracy_matrices(reports)
plot_average_accuracy(reports)
