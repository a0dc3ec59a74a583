"""Training: the backbone h_bb (ArcFace, optional angular distillation), the hypernetwork h_gen
(weighted BCE + norm penalty, KCS, objective schedule), enrollment and the ablation.

Public API (what the pipeline calls):
    train_backbone(cfg: BackboneConfig, dataset, out_dir, resume=True) -> Path
    train_hypernet(cfg: HypernetConfig, backbone_ckpt, dataset, out_dir, resume=True) -> Path
    enroll_images(hypernet_ckpt, images_uint8_nhwc, out_dir, user=None) -> Path
    enroll_folder(hypernet_ckpt, users_dir, out_dir) -> list[Path]
    run_ablation(cfg, backbone_ckpt, dataset, pairs, out_dir, variants=...) -> list[dict]
    evaluate_pairs(hypernet_ckpt, pairs) -> dict        (toolchain.evaluate.per_user)
"""

from toolchain.train.config import BackboneConfig, DistillConfig, HypernetConfig

__all__ = ["BackboneConfig", "DistillConfig", "HypernetConfig", "enroll_folder", "enroll_images", "evaluate_pairs",
           "run_ablation", "train_backbone", "train_hypernet"]


def __getattr__(name):  # lazy: importing the configs (recipe schema) must not import torch
    if name == "train_backbone":
        from toolchain.train.backbone import train_backbone
        return train_backbone
    if name == "train_hypernet":
        from toolchain.train.hypernet import train_hypernet
        return train_hypernet
    if name in ("enroll_images", "enroll_folder"):
        from toolchain.train import enroll
        return getattr(enroll, name)
    if name == "run_ablation":
        from toolchain.train.ablation import run_ablation
        return run_ablation
    if name == "evaluate_pairs":
        from toolchain.evaluate.per_user import evaluate_pairs
        return evaluate_pairs
    raise AttributeError(f"module 'toolchain.train' has no attribute {name!r}")
