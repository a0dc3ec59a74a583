import numpy as np
import pytest
import torch


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
