"""A new user's data, two ways, as image folders (issue 31's aim): Fashion-MNIST (fits the
shipped base) and scikit-learn's digits upscaled to 28x28 (does not). 4 labeled images per
class (40), an unlabeled/ folder (2,000; digits 1,300) and test/ (20 per class).

    .venv/bin/python bench/own_data_folders.py OUT_DIR
    augment init OUT_DIR/fashion-folder --out fashion.yaml && augment run fashion.yaml
"""

import sys
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

from pipeline.data.datasets import load_dataset


def write(root, images, labels, names, n_lab=4, n_unl=2000, n_test=20, seed=0):
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    root = Path(root)
    used = set()
    for c, name in enumerate(names):
        idx = [i for i in order if labels[i] == c][: n_lab + n_test]
        for j, i in enumerate(idx[:n_lab]):
            (root / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i][..., 0]).save(root / name / f"{j:03d}.png")
        for j, i in enumerate(idx[n_lab:]):
            (root / "test" / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i][..., 0]).save(root / "test" / name / f"{j:03d}.png")
        used.update(idx)
    rest = [i for i in order if i not in used][:n_unl]
    (root / "unlabeled").mkdir(parents=True, exist_ok=True)
    for j, i in enumerate(rest):
        Image.fromarray(images[i][..., 0]).save(root / "unlabeled" / f"{j:04d}.png")

out = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
fm = load_dataset("fashion-mnist")
write(out / "fashion-folder", fm.train_images[:20000], fm.train_labels[:20000],
      [f"{i}-{n.split('/')[0].lower().replace(' ', '-')}" for i, n in enumerate(fm.class_names)])
d = load_digits()
imgs = np.stack([np.asarray(Image.fromarray((im * 255 / 16).astype(np.uint8)).resize((28, 28), Image.BICUBIC)) for im in d.images])[..., None]
write(out / "digits-folder", imgs, d.target, [str(i) for i in range(10)], n_unl=1300, n_test=20)
