"""Shared fixtures. OMP threads: 2, the CI machine's cores."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session")
def registry_hypernet_ckpt(tmp_path_factory):
    """A few steps of MobileFaceNet and h_gen on synthetic faces (a registered backbone, so the
    server process can load the checkpoint)."""
    import torch

    from toolchain.train import BackboneConfig, HypernetConfig, train_backbone, train_hypernet

    class Faces(torch.utils.data.Dataset):
        def __init__(self):
            from toolchain.data.synthetic import SyntheticFaces

            gen = SyntheticFaces(seed=9)
            self.labels = np.repeat(np.arange(12), 4)
            imgs = gen.render_batch(self.labels, np.tile(np.arange(4), 12))
            self.images = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1
            self.num_classes = 12

        def __len__(self):
            return len(self.labels)

        def __getitem__(self, i):
            return self.images[i], int(self.labels[i])

    out = tmp_path_factory.mktemp("serve-hn")
    data = Faces()
    bb = train_backbone(BackboneConfig(model="mobilefacenet", embedding_size=32, max_steps=3, batch_size=8,
                                       warmup_steps=1, progress=False), data, out / "bb")
    return train_hypernet(HypernetConfig(steps=6, identities_per_batch=4, probes_per_identity=1, val_identities=0.3,
                                         kcs_recluster_every=3, checkpoint_every=3, progress=False), bb, data, out / "hn")


@pytest.fixture(scope="module")
def enrolled_random_verifier():
    """A factory: (model, user folder, rng) for a random-init verifier enrolled under `root` with
    `threshold`, and 8 calibration images saved as root/calib.npy (rng continues after them)."""
    from toolchain.models import build_model
    from toolchain.models.io import save_enrollment

    def make(root, threshold):
        torch.manual_seed(0)
        model = build_model("verifier").eval()
        user = save_enrollment(root / "user", model, {}, threshold=threshold)
        rng = np.random.default_rng(0)
        np.save(root / "calib.npy", rng.integers(0, 256, (8, 112, 112, 3), dtype=np.uint8))
        return model, user, rng

    return make
