"""Tables for profiles and budget verdicts: rich for the terminal, Markdown for reports."""

from __future__ import annotations

from typing import Any, Iterable

from rich.table import Table


def fmt_count(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and abs(value) >= 1000):
        return f"{int(value):,}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def millions(value: int) -> str:
    return f"{value / 1e6:.3f}M"


def _row(r: Any) -> dict:
    """A BudgetResult, any object with to_dict(), or a dict."""
    if isinstance(r, dict):
        d = dict(r)
    elif hasattr(r, "to_dict"):
        d = r.to_dict()
    else:
        d = dict(vars(r))
    if "verdict" not in d:
        d["verdict"] = "pass" if d.get("passed") else "FAIL"
    return d


def budget_table(rows: Iterable[Any], title: str | None = "Budgets") -> Table:
    table = Table(title=title)
    for col, justify in (("budget", "left"), ("value", "right"), ("", "center"),
                         ("limit", "right"), ("verdict", "left"), ("note", "left")):  # fmt: skip
        table.add_column(col, justify=justify)
    for r in map(_row, rows):
        verdict = r["verdict"]
        style = "green" if verdict == "pass" else "bold red"
        table.add_row(
            str(r.get("name", "")),
            fmt_count(r.get("value")),
            str(r.get("compare", "<=")),
            fmt_count(r.get("limit")),
            f"[{style}]{verdict}[/{style}]",
            str(r.get("note", "") or ""),
        )
    return table


def budget_rows_json(rows: Iterable[Any]) -> list[dict]:
    return [_row(r) for r in rows]


def profile_table(profiles: list[dict], title: str | None = None) -> Table:
    table = Table(title=title)
    for col in ("model", "input", "params", "MACs", "FLOPs", "elementwise ops", "unsupported ops"):
        left = col in ("model", "input", "unsupported ops")
        table.add_column(col, justify="left" if left else "right", no_wrap=col != "unsupported ops")
    for p in profiles:
        table.add_row(
            p["model"],
            "x".join(str(v) for v in p["input_shape"][1:]),
            fmt_count(p["params"]),
            millions(p["macs"]),
            millions(p["flops"]),
            millions(p["elementwise_ops"]),
            ", ".join(f"{k} x{v}" for k, v in p["unsupported_ops"].items()) or "none",
        )
    return table


def file_table(info: dict) -> Table:
    table = Table(show_header=False)
    for k in ("path", "format", "bytes", "sha256"):
        table.add_row(k, fmt_count(info[k]))
    return table


def profiles_markdown(profiles: list[dict]) -> str:
    lines = [
        "| model | input | params | MACs | FLOPs | elementwise ops | unsupported ops |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for p in profiles:
        unsupported = ", ".join(f"`{k}` x{v}" for k, v in p["unsupported_ops"].items()) or "none"
        lines.append(
            f"| {p['model']} | {'x'.join(str(v) for v in p['input_shape'][1:])} "
            f"| {p['params']:,} | {millions(p['macs'])} | {millions(p['flops'])} "
            f"| {millions(p['elementwise_ops'])} | {unsupported} |"
        )
    return "\n".join(lines)


def profile_markdown(profile: dict, layers: list[dict] | None = None) -> str:
    """A model's summary, its convention, and (when given) the per-layer breakdown."""
    out = [f"## {profile['model']}", "", profiles_markdown([profile]), ""]
    out += ["Convention:", ""]
    out += [f"- `{k}`: {v}" for k, v in profile["convention"].items()]
    if layers:
        out += ["", "### Per layer", "",
                "| module | type | params | MACs | FLOPs | elementwise ops | unsupported |",
                "|---|---|---:|---:|---:|---:|---|"]  # fmt: skip
        for r in layers:
            name = r["module"] or "(model)"
            indent = "&nbsp;&nbsp;" * max(r["depth"] - 1, 0)
            unsupported = ", ".join(f"`{k}` x{v}" for k, v in r["unsupported_ops"].items())
            out.append(
                f"| {indent}`{name}` | {r['type']} | {r['params']:,} | {r['macs']:,} "
                f"| {r['flops']:,} | {r['elementwise_ops']:,} | {unsupported} |"
            )
    return "\n".join(out) + "\n"
