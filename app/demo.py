"""The README demo, as an HTTP client of a running service.

Registers digits (train/test split), trains an MLP on the service, runs a
TracInCP job for a few test digits, prints their top proponents and opponents,
and writes one PNG per query: the query beside its proponents and opponents.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from app.client import InfluenceClient

QUERIES = [0, 1, 2, 3]
TOP_K = 5


def run_demo(base_url: str, output: str, api_key: str) -> list[Path]:
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    with InfluenceClient(base_url, api_key, timeout=60) as ia:
        train = ia.builtin_dataset("sklearn:digits", "train")
        test = ia.builtin_dataset("sklearn:digits", "test")
        recipe = {
            "optimizer": "sgd",
            "learning_rate": 0.1,
            "momentum": 0.9,
            "epochs": 20,
            "batch_size": 64,
            "weight_decay": 1e-3,
            "seed": 0,
            "num_checkpoints": 5,
        }
        architecture = {"name": "mlp", "params": {"in_features": 64, "hidden": [64], "num_classes": 10}}
        model = ia.register_model("digits-mlp", architecture, recipe=recipe, train_dataset_id=train["id"])
        print(f"model {model['id']} is training ...")
        ia.wait_model(model["id"], timeout=600)
        job = ia.submit_job(
            model["id"],
            train["id"],
            "tracincp",
            query_dataset_id=test["id"],
            query_indices=QUERIES,
            output={"top_k": TOP_K},
        )
        print(f"influence job {job['id']} submitted (TracInCP over 5 checkpoints)")
        ia.wait(job["id"], timeout=600)
        results = ia.results_page(job["id"])
    return _report(results, out)


def _report(results: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.datasets import load_digits

    digits = load_digits()
    paths = []
    print(f"\nTracInCP, {results['sign_convention']}")
    for item in results["items"]:
        query_id = item["query_id"]
        query_digit = int(digits.target[query_id])
        pro = [(p["train_id"], int(digits.target[p["train_id"]]), p["score"]) for p in item["proponents"]]
        opp = [(p["train_id"], int(digits.target[p["train_id"]]), p["score"]) for p in item["opponents"]]
        print(
            f"digits #{query_id} (a {query_digit}): proponents "
            + ", ".join(f"{label} (id {i}, {s:+.3g})" for i, label, s in pro)
            + " | opponents "
            + ", ".join(f"{label} (id {i}, {s:+.3g})" for i, label, s in opp)
        )
        fig, axes = plt.subplots(1, 1 + 2 * len(pro), figsize=(1.6 * (1 + 2 * len(pro)), 2.2))
        panels = (
            [("query", query_id, None)]
            + [("pro", i, s) for i, _, s in pro]
            + [("opp", i, s) for i, _, s in opp]
        )
        for ax, (kind, row, score) in zip(axes, panels, strict=True):
            ax.imshow(digits.images[row], cmap="gray_r")
            ax.set_xticks([])
            ax.set_yticks([])
            title = (
                f"query: {digits.target[row]}"
                if kind == "query"
                else f"{kind} {digits.target[row]}\n{score:+.2g}"
            )
            ax.set_title(title, fontsize=8, color={"query": "black", "pro": "green", "opp": "red"}[kind])
        fig.tight_layout()
        path = out / f"query-{query_id}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    print(f"\nwrote {len(paths)} PNGs to {out}/")
    return paths


def run_demo_when_ready(base_url: str, output: str, api_key: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(base_url + "/readyz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    try:
        run_demo(base_url, output, api_key)
    except Exception as exc:  # noqa: BLE001 - the server keeps running; say what went wrong
        print(f"demo failed: {exc}")
