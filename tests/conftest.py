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


@pytest.fixture
def check_int8_pte(tmp_path):
    """check_int8_pte(model): export `model` as an int8 .pte (toolchain's quantizer and
    partitioner) and check that it is one XNNPACK partition with no float op, and that its outputs
    on random 32x32 images are within two output steps of torch's int8 reference graph and near
    float."""
    return lambda model: _check_int8_pte(model, tmp_path)


def _check_int8_pte(model, tmp_path, size: int = 32) -> None:
    from executorch.exir import to_edge_transform_and_lower
    from executorch.runtime import Runtime

    from toolchain.export.executorch import delegation_report, xnnpack_partitioner
    from toolchain.quantize.pt2e import quantize_xnnpack_int8
    from toolchain.runtime.preprocess import model_input

    rng = np.random.default_rng(0)
    calib = rng.integers(0, 256, (16, size, size, 3), dtype=np.uint8)
    mean = std = (0.5, 0.5, 0.5)
    x = torch.zeros(1, 3, size, size)
    report = {}
    reference = quantize_xnnpack_int8(model, x, calib, mean, std, report=report)  # torch's int8 graph
    assert report["float_ops"] == {}, report
    edge = to_edge_transform_and_lower(torch.export.export(reference, (x,), strict=False),
                                       partitioner=[xnnpack_partitioner()])
    delegation = delegation_report(edge)
    assert delegation.partitions == 1 and delegation.fully_delegated, delegation.to_dict()
    path = tmp_path / "model_int8.pte"
    path.write_bytes(edge.to_executorch().buffer)
    method = Runtime.get().load_program(str(path)).load_method("forward")
    reference = quantize_xnnpack_int8(model, x, calib, mean, std)  # lowering consumed the first one
    for image in rng.integers(0, 256, (4, 1, size, size, 3), dtype=np.uint8):
        inp = torch.from_numpy(model_input(image, mean, std))
        out = method.execute([inp])[0].numpy()
        with torch.no_grad():
            ref_q, ref_f = reference(inp).numpy(), model(inp).numpy()
        step = np.abs(ref_f).max() / 127
        assert np.abs(out - ref_q).max() <= 2 * step + 1e-6  # within two output steps of torch's int8
        assert np.abs(out - ref_f).max() < 0.1 * np.abs(ref_f).max()
