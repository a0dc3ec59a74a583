"""Quality at fleet scale: K sampled users' int8 files in their real runtimes, and a report.

Each sampled user's probes are that user's other images (a folder source) and the mirror of the
enrollment image, plus up to 200 other users' enrollment images as impostors. Every int8 file is
run in its runtime (toolchain.evaluate.parity) against that user's float verifier, at the
enrollment threshold. `write_fleet_report` shows the fleet's distribution of decision agreement
and logit gap, with a plot.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

MAX_IMPOSTORS = 200


def fleet_parity(bundle, done_users, all_users, out: Path, k: int, seed: int = 0, say=None) -> list[dict]:
    from toolchain.evaluate.parity import ProbeSet, run_parity
    from toolchain.models.io import save_enrollment
    from toolchain.train.enroll import read_image, user_theta

    rng = np.random.default_rng(seed)
    sample = [done_users[i] for i in sorted(rng.choice(len(done_users), min(k, len(done_users)), replace=False))]
    hw = (112, 112)
    pick = rng.choice(len(all_users), min(len(all_users), MAX_IMPOSTORS + k), replace=False)
    impostor_pool = []
    for i in pick:
        try:
            impostor_pool.append((all_users[i].user, read_image(all_users[i].image, hw)))
        except Exception:  # noqa: BLE001 - an unreadable image was reported already
            continue
    rows = []
    with tempfile.TemporaryDirectory(prefix="toolchain-fleet-parity-") as tmp:
        for n, u in enumerate(sample, 1):
            enroll = read_image(u.image, hw)
            positives = [enroll[:, ::-1]]
            for p in u.others:
                try:
                    positives.append(read_image(p, hw))
                except Exception:  # noqa: BLE001
                    continue
            impostors = [img for who, img in impostor_pool if who != u.user][:MAX_IMPOSTORS]
            images = np.stack(positives + impostors)
            labels = np.r_[np.ones(len(positives), bool), np.zeros(len(impostors), bool)]
            theta = user_theta(bundle, enroll[None])
            ref = save_enrollment(Path(tmp) / u.user, bundle.hypernet.build_verifier(theta),
                                  bundle.hypernet.verifier_kwargs, bundle.threshold, user=u.user)
            arts = sorted((out / u.user).glob("verifier_int8.*"))
            for row in run_parity(arts, ProbeSet(images, labels, name=u.user), ref, repeats=3):
                rows.append({"user": u.user, "artifact": f"{u.user}/{Path(row['artifact']).name}",
                             "format": row["format"], "probes": row["num"],
                             "decision_agreement": row["decision_agreement"], "max_abs_gap": row["max_abs_gap"],
                             "mean_abs_gap": row["mean_abs_gap"], "accuracy_drop": row["accuracy_drop"],
                             "passed": row["passed"], "reason": row["reason"]})
            if say:
                say(f"parity: {n}/{len(sample)} users")
    return rows


def write_fleet_report(out: Path, result, manifest: dict) -> Path:
    """DIR/fleet_report.md (+ fleet_report_files/parity.png when parity ran)."""
    from toolchain.atomic import atomic_write_bytes

    users = manifest.get("users", [])
    modes = {m: sum(1 for e in users if e.get("mode") == m) for m in ("patched", "full")}
    lines = ["# Fleet report", "", f"{len(users)} users in `{out}`: {modes['patched']} patched from templates, "
             f"{modes['full']} full exports (fallback).", "",
             "| template | id |", "|---|---|"]
    lines += [f"| {k} | `{v}` |" for k, v in manifest.get("templates", {}).items()]
    t = result.timings
    if t:
        lines += ["", "| step | seconds |", "|---|---|"]
        lines += [f"| {k.replace('_', ' ')} | {v:.2f} |" for k, v in t.items() if isinstance(v, (int, float))]
    if result.fallbacks:
        lines += ["", "Full exports (fallback):", ""] + [f"- {f}" for f in result.fallbacks]
    if result.problems:
        lines += ["", "Skipped:", ""] + [f"- {p}" for p in result.problems]
    if result.parity:
        rows = result.parity
        lines += ["", f"## Parity of {len({r['user'] for r in rows})} sampled users' int8 files", ""]
        for fmt in sorted({r["format"] for r in rows}):
            agree = np.array([r["decision_agreement"] for r in rows if r["format"] == fmt])
            gap = np.array([r["max_abs_gap"] for r in rows if r["format"] == fmt])
            lines += [f"- {fmt}: decision agreement min {agree.min():.2f}%, median {np.median(agree):.2f}%, "
                      f"mean {agree.mean():.2f}%; max logit gap median {np.median(gap):.3f}, max {gap.max():.3f}; "
                      f"{sum(r['passed'] for r in rows if r['format'] == fmt)}/{len(agree)} within the bounds"]
        lines += ["", "| user | file | probes | decision agreement | max logit gap | mean logit gap | verdict |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['user']} | {r['artifact']} | {r['probes']} | {r['decision_agreement']:.2f}% | "
                  f"{r['max_abs_gap']:.3f} | {r['mean_abs_gap']:.4f} | {'PASS' if r['passed'] else r['reason']} |"
                  for r in rows]
        png = _plot(out, rows)
        lines += ["", f"![decision agreement and logit gap]({png.relative_to(out)})"]
    path = out / "fleet_report.md"
    text = "\n".join(lines) + "\n"
    atomic_write_bytes(path, lambda tmp: Path(tmp).write_text(text))
    return path


def _plot(out: Path, rows: list[dict]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = out / "fleet_report_files"
    folder.mkdir(exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for fmt in sorted({r["format"] for r in rows}):
        sel = [r for r in rows if r["format"] == fmt]
        axes[0].hist([r["decision_agreement"] for r in sel], bins=20, alpha=0.6, label=fmt)
        axes[1].hist([r["max_abs_gap"] for r in sel], bins=20, alpha=0.6, label=fmt)
    axes[0].set_xlabel("decision agreement with float (%)")
    axes[1].set_xlabel("max |int8 - float| logit")
    for ax in axes:
        ax.set_ylabel("users")
        ax.legend()
    fig.tight_layout()
    path = folder / "parity.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
