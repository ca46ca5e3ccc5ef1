"""Figure of the user guide: how one input is read through the bottleneck.

Rendered at build time by matplotlib's ``plot`` directive.
"""

import matplotlib.pyplot as plt
import numpy as np

rng = np.random.RandomState(3)
n_heads, n_keys, n_classes = 3, 12, 4
keys = rng.uniform(-1, 1, size=(n_heads, n_keys, 2))
queries = rng.uniform(-0.7, 0.7, size=(n_heads, 2))
values = rng.normal(size=(n_heads, n_keys, n_classes))
nearest = np.argmin(((keys - queries[:, None]) ** 2).sum(-1), axis=1)

fig = plt.figure(figsize=(10, 4.2), layout="constrained")
grid = fig.add_gridspec(2, n_heads + 2, height_ratios=[1.2, 1])
g = np.linspace(-1.1, 1.1, 200)
gx, gy = np.meshgrid(g, g)
points = np.stack([gx.ravel(), gy.ravel()], 1)
for c in range(n_heads):
    ax = fig.add_subplot(grid[0, c])
    cells = np.argmin(((points[:, None] - keys[c][None]) ** 2).sum(-1), 1).reshape(gx.shape)
    ax.imshow(cells, extent=(-1.1, 1.1, -1.1, 1.1), origin="lower", cmap="Pastel1", alpha=0.7)
    ax.scatter(*keys[c].T, s=14, c="k", label="keys (frozen)")
    ax.scatter(*queries[c], marker="*", s=160, c="crimson", label="query")
    ax.plot(*np.stack([queries[c], keys[c, nearest[c]]]).T, c="crimson", lw=1)
    ax.set_title(f"head {c + 1}: key {nearest[c]} selected", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    if c == 0:
        ax.legend(fontsize=7, loc="lower left")
    vax = fig.add_subplot(grid[1, c])
    vax.imshow(values[c].T, aspect="auto", cmap="coolwarm", vmin=-2.5, vmax=2.5)
    vax.add_patch(plt.Rectangle((nearest[c] - 0.5, -0.5), 1, n_classes, fill=False, ec="crimson", lw=2))
    vax.set_xlabel("key index", fontsize=8)
    vax.set_yticks(range(n_classes))
    vax.set_yticklabels([f"class {k}" for k in range(n_classes)], fontsize=6)
    vax.set_xticks([])
    vax.set_title(f"values of head {c + 1} (trained)", fontsize=8)

text = fig.add_subplot(grid[0, n_heads:])
text.axis("off")
text.text(
    0.0,
    0.5,
    "input x\n  -> frozen encoder: z in R^D\n  -> C fixed projections: queries in R^d\n"
    "  -> nearest key per head (frozen)\n  -> read the C selected values\n  -> mean -> class scores",
    fontsize=9,
    va="center",
    family="monospace",
)
sax = fig.add_subplot(grid[1, n_heads:])
scores = values[np.arange(n_heads), nearest].mean(0)
sax.bar(range(n_classes), scores, color=["crimson" if k == scores.argmax() else "grey" for k in range(n_classes)])
sax.set_xticks(range(n_classes))
sax.set_xlabel("class", fontsize=8)
sax.set_title("decoder: mean of the selected values", fontsize=8)
