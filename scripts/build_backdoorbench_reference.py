"""Rebuild ``results/reference/backdoorbench_cifar10.csv`` from BackdoorBench's leaderboard.

    git clone https://github.com/backdoorbench/backdoorbench.github.io lb
    git -C lb checkout b98eab4
    python scripts/build_backdoorbench_reference.py lb --commit b98eab4

Reads the CIFAR-10 PreAct-ResNet18 cells of ``leaderboard-cifar10.html`` (one tab per poison
rate; CA / ASR / RA per defense) and ``static/data/results.csv`` (fractions) of the same
checkout, and writes one row per (attack, defense, poison rate) in the harness's names, rates in
percent as published. Which source a row takes:

- the HTML, where it has the cell (it is the leaderboard as published);
- the CSV where the HTML shows N/A (SIG and label-consistent at 10%: the CSV's v1 data, where
  pratio 0.1 poisons the whole target class) or where the CSV has no 0 placeholder and the
  HTML lacks the cell.

Every cell present in both with a difference over 0.01 points gets a ``note`` naming the
CSV's numbers, so the choice can be checked.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import pandas as pd

from benchmark.io import atomic_write_text

# BackdoorBench's names -> the harness's (attacks) and the lower-case ids (defenses).
ATTACKS = {
    "BadNet": "badnets", "Blended": "blend", "LC": "label_consistent", "SIG": "sig",
    "WaNet": "wanet", "InputAware": "input_aware", "LF": "lf", "SSBA": "ssba", "BPP": "bpp",
    "TrojanNN": "trojannn",
}  # fmt: skip
CSV_ATTACKS = {
    "badnet": "badnets", "blended": "blend", "lc": "label_consistent", "sig": "sig",
    "wanet": "wanet", "inputaware": "input_aware", "lf": "lf", "ssba": "ssba", "bpp": "bpp",
    "trojannn": "trojannn",
}  # fmt: skip
CSV_DEFENSES = {"no defense": "undefended", "spectral": "ss"}
METRICS = ("clean_acc", "asr", "ra")
HTML = "leaderboard-cifar10.html"
OLD_HTML = "leaderboard-cifar10(old).html"  # the v1 leaderboard page
CSV = "static/data/results.csv"
# The v1 page's attack names (its rows: model, attack, then CA/ASR/RA per defense).
OLD_NAMES = {
    "badnets": "BadNets", "blend": "Blended", "label_consistent": "LC", "sig": "SIG",
    "wanet": "WaNet", "input_aware": "Input-aware", "lf": "LF", "ssba": "SSBA",
}  # fmt: skip


def defense_id(name: str) -> str:
    """``No Defense`` -> ``undefended``; ``i-BAU`` -> ``i_bau``; ``FT`` -> ``ft``."""
    name = name.strip()
    if name.lower() in CSV_DEFENSES:
        return CSV_DEFENSES[name.lower()]
    return name.lower().replace("-", "_")


def _number(text: str) -> float | None:
    text = text.strip()
    return None if text in ("", "N/A", "-") else float(text)


def html_cells(html: str) -> pd.DataFrame:
    """Every PreActResNet-18 cell of every ``pratio-*`` tab of the leaderboard page."""
    starts = [(m.start(), m.group(1)) for m in re.finditer(r'<div id="pratio-([0-9_]+)"', html)]
    rows = []
    for i, (start, tab) in enumerate(starts):
        end = starts[i + 1][0] if i + 1 < len(starts) else len(html)
        seg = html[start:end]
        defenses = [
            defense_id(d) for d in re.findall(r'<th[^>]*colspan="3"[^>]*>([^<]+)</th>', seg)
        ]
        rate = float(tab.replace("_", "."))
        for line in seg.splitlines():
            cells = re.findall(r"<td[^>]*>([^<]*)</td>", line)
            if len(cells) < 2 or cells[0].strip() != "PreActResNet-18":
                continue
            values = cells[2:]
            if len(values) != 3 * len(defenses):
                raise ValueError(f"tab {tab}: {len(values)} values for {len(defenses)} defenses")
            for j, defense in enumerate(defenses):
                rows.append(
                    {
                        "attack": ATTACKS[cells[1].strip()],
                        "defense": defense,
                        "poison_rate": rate,
                        **dict(zip(METRICS, map(_number, values[3 * j : 3 * j + 3]), strict=True)),
                        "tab": f"pratio-{tab}",
                    }
                )
    return pd.DataFrame(rows)


def csv_cells(path: Path) -> pd.DataFrame:
    """The CIFAR-10 PreAct-ResNet18 rows of ``results.csv``, in percent; 0 placeholders dropped."""
    data = pd.read_csv(path, index_col=0)
    data = data[(data["dataset"] == "cifar10") & (data["backbone"] == "preactresnet18")]
    out = pd.DataFrame(
        {
            "attack": data["attack_name"].map(CSV_ATTACKS),
            "defense": data["defense_name"].map(defense_id),
            "poison_rate": data["ratio"].astype(float),
            "clean_acc": 100 * data["test_acc"],
            "asr": 100 * data["test_asr"],
            "ra": 100 * data["test_ra"],
        }
    )
    # 0 / 0 and -100 / -100 mark missing cells in the CSV.
    placeholder = ((out["clean_acc"] == 0) & (out["asr"] == 0)) | (out["clean_acc"] < 0)
    out[list(METRICS)] = out[list(METRICS)].round(2)
    return out[~placeholder & out["attack"].notna()]


def in_old_page(old_html: str, attack: str, values: list[float]) -> bool:
    """Whether ``values`` (CA, ASR, RA) are consecutive cells of a PreAct row of ``attack`` on
    the v1 leaderboard page."""
    name = OLD_NAMES.get(attack)
    if name is None:
        return False
    wanted = [round(float(v), 2) for v in values]
    for row in re.findall(
        rf"<td>PreAct-Resnet18</td>\s*<td>{re.escape(name)}</td>(.*?)</tr>", old_html
    ):
        cells = [_number(c) for c in re.findall(r"<td>([^<]*)</td>", row)]
        for i in range(len(cells) - 2):
            if cells[i : i + 3] == wanted:
                return True
    return False


def build(html: str, csv_path: Path, commit: str, old_html: str = "") -> pd.DataFrame:
    keys = ["attack", "defense", "poison_rate"]
    h, c = html_cells(html), csv_cells(csv_path)
    merged = h.merge(c, on=keys, how="outer", suffixes=("_html", "_csv"))
    rows = []
    site = f"backdoorbench.github.io@{commit}"
    for _, r in merged.iterrows():
        in_html = pd.notna(r.get("clean_acc_html"))
        in_csv = pd.notna(r.get("clean_acc_csv"))
        note = ""
        if in_html:
            values = [r[f"{m}_html"] for m in METRICS]
            source = f"{site} {HTML} tab {r['tab']}"
            if in_csv:
                csv_values = [r[f"{m}_csv"] for m in METRICS]
                if any(abs(a - b) > 0.011 for a, b in zip(values, csv_values, strict=True)):
                    note = (
                        "HTML used (the published leaderboard page); results.csv has "
                        + " / ".join(f"{v:.2f}" for v in csv_values)
                    )
                    if in_old_page(old_html, r["attack"], csv_values):
                        note += f", the v1 page's numbers ({OLD_HTML})"
            else:
                source += " (HTML only: results.csv has a 0 placeholder or no row)"
        elif in_csv:
            values = [r[f"{m}_csv"] for m in METRICS]
            source = f"{site} {CSV} (the HTML shows N/A)"
            if r["poison_rate"] == 0.1 and r["attack"] in ("sig", "label_consistent"):
                source += "; v1 data, 10% = the whole target class"
        else:
            continue
        if all(pd.isna(v) for v in values):
            continue
        rows.append(
            {
                "source": source,
                "dataset": "cifar10",
                "model": "preact_resnet18",
                "attack": r["attack"],
                "defense": r["defense"],
                "poison_rate": r["poison_rate"],
                **dict(zip(METRICS, values, strict=True)),
                "note": note,
            }
        )
    out = pd.DataFrame(rows)
    rate_order = out["poison_rate"].rank(method="dense", ascending=False)
    undefended_first = out["defense"] != "undefended"
    return (
        out.assign(_r=rate_order, _d=undefended_first)
        .sort_values(["_r", "attack", "_d", "defense"])
        .drop(columns=["_r", "_d"])
        .reset_index(drop=True)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkout", type=Path, help="a checkout of backdoorbench.github.io")
    parser.add_argument("--commit", required=True, help="the checkout's commit, for the source")
    parser.add_argument(
        "--out", type=Path, default=Path("results/reference/backdoorbench_cifar10.csv")
    )
    args = parser.parse_args(argv)
    old = args.checkout / OLD_HTML
    table = build(
        (args.checkout / HTML).read_text(),
        args.checkout / CSV,
        args.commit,
        old.read_text() if old.exists() else "",
    )
    table[list(METRICS)] = table[list(METRICS)].round(2)
    atomic_write_text(args.out, table.to_csv(index=False))
    notes = table[table["note"] != ""]
    print(f"wrote {args.out}: {len(table)} rows, {len(notes)} with a note")
    for _, r in notes.iterrows():
        print(f"  {r['attack']} {r['defense']} {r['poison_rate']}: {r['note']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
