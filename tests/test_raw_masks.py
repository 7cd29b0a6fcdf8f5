"""Saved masks are the method's raw prediction: the ground truth's background is applied when scoring
only, never painted into the masks that evaluation saves (and the figures draw)."""

import numpy as np
import torch
from PIL import Image

from pathmamba.data.datasets import to_tensor
from pathmamba.data.readers import index_dataset, read_image, read_mask
from pathmamba.data.specs import get_dataset_spec
from pathmamba.data.synthetic import make_synthetic_dataset
from pathmamba.engine.evaluate import evaluate
from pathmamba.engine.registry import build_method

TINY = {"backbone": "resnet18", "width": 8}


def test_saved_masks_are_the_raw_argmax_also_on_unscored_background(tmp_path):
    spec = get_dataset_spec("synthetic-luad")
    root = tmp_path / "data"
    make_synthetic_dataset("synthetic-luad", root, n_train=4, n_val=2, n_test=12, size=32, seed=0)
    torch.manual_seed(0)
    model = build_method("cam", 4, **TINY).eval()
    torch.save({"method": "cam", "stage": None, "dataset": "synthetic-luad", "seed": 0, "epoch": 1, "val_mIoU": 0.0,
                "hparams": TINY, "state_dict": model.state_dict()}, tmp_path / "model.pt")
    evaluate(tmp_path / "model.pt", root, tmp_path / "eval", masks_dir=tmp_path / "masks", n_masks=12,
             device="cpu")
    background_seen = 0
    for image_path, mask_path in index_dataset(root, spec).test:
        saved = np.asarray(Image.open(tmp_path / "masks" / image_path.name))
        with torch.no_grad():
            expected = model.predict(to_tensor(read_image(image_path))[None]).argmax(1)[0].numpy()
        assert (saved == expected).all() and saved.max() <= 3
        background_seen += int((read_mask(mask_path, spec) == 4).sum())
    assert background_seen > 0  # the case this test is about: unscored pixels keep their prediction
