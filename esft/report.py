"""Human-readable views of expert scores: heatmaps, concentration, task overlap."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from esft.scores import ExpertScores, layer_score_dict
from esft.select import select_top_p

CONCENTRATION_LEVELS = (0.1, 0.2, 0.5)


def experts_to_reach(scores_LE: np.ndarray, top_p: float) -> list[int]:
    """Per layer, how many experts the selection rule takes to reach `top_p` of the score mass."""
    summary = layer_score_dict(tuple(range(len(scores_LE))), scores_LE)
    return [len(select_top_p([summary[str(layer)][str(e)] for e in range(scores_LE.shape[1])], top_p))
            for layer in range(len(scores_LE))]


def concentration_table(scores: ExpertScores) -> dict:
    """{"token": {"0.1": [experts per layer], ...}, "gate": {...}, "layers": [...]}."""
    table: dict = {"layers": list(scores.layers), "num_experts": scores.num_experts}
    for function in ("token", "gate"):
        matrix = scores.scores(function)
        table[function] = {str(p): experts_to_reach(matrix, p) for p in CONCENTRATION_LEVELS}
    return table


def concentration_markdown(table: dict, task: str) -> str:
    header = "| layer | " + " | ".join(f"token p={p}" for p in CONCENTRATION_LEVELS) + " | " + " | ".join(
        f"gate p={p}" for p in CONCENTRATION_LEVELS
    ) + " |"
    lines = [f"# Routing concentration: {task}", "",
             f"Experts (of {table['num_experts']}) needed per layer to reach a share p of the score mass.", "",
             header, "|" + "---|" * (1 + 2 * len(CONCENTRATION_LEVELS))]
    for i, layer in enumerate(table["layers"]):
        cells = [str(table[f][str(p)][i]) for f in ("token", "gate") for p in CONCENTRATION_LEVELS]
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def overlap(a: ExpertScores, b: ExpertScores, function: str = "token", top_p: float = 0.2) -> list[int]:
    """Per layer, how many experts the two tasks' selections share (the paper's Fig. 2 question)."""
    sel_a = experts_sets(a, function, top_p)
    sel_b = experts_sets(b, function, top_p)
    return [len(x & y) for x, y in zip(sel_a, sel_b)]


def experts_sets(scores: ExpertScores, function: str, top_p: float) -> list[set[int]]:
    matrix = scores.scores(function)
    summary = layer_score_dict(scores.layers, matrix)
    return [set(select_top_p([summary[str(layer)][str(e)] for e in range(scores.num_experts)], top_p)) for layer in scores.layers]


def save_heatmaps(scores: ExpertScores, out_dir: Path, task: str) -> list[Path]:
    """One PNG per score function: layers x experts, darker = more relevant, selected experts
    (token p = 0.2 / gate p = 0.1, the paper's defaults) outlined."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for function, top_p in (("token", 0.2), ("gate", 0.1)):
        matrix = scores.scores(function)
        selected = experts_sets(scores, function, top_p)
        width = min(24.0, max(7.0, 2.0 + 0.18 * scores.num_experts))
        height = min(16.0, 1.5 + 0.3 * len(scores.layers))
        fig, ax = plt.subplots(figsize=(width, height))
        image = ax.imshow(matrix, aspect="auto", cmap="viridis", interpolation="nearest")
        for row, chosen in enumerate(selected):
            for expert in chosen:
                ax.add_patch(plt.Rectangle((expert - 0.5, row - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.2))
        ax.set_yticks(range(len(scores.layers)), [str(layer) for layer in scores.layers])
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_xlabel("routed expert")
        ax.set_ylabel("decoder layer")
        ax.set_title(f"{task}: {function} scores over {scores.total_tokens:,} tokens; red = selected at p={top_p}", fontsize=10)
        fig.colorbar(image, ax=ax, label=f"{function} score")
        fig.tight_layout()
        path = out_dir / f"heatmap_{function}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def save_selection_plot(config, num_experts: int, path: Path) -> Path:
    """Bars per MoE layer: how many routed experts an expert config trains, out of `num_experts`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = config.layers
    counts = [len(config.experts_of(layer)) for layer in layers]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.35 * len(layers) + 2), 3.2))
    ax.bar([str(layer) for layer in layers], counts, color="tab:blue")
    ax.axhline(num_experts, color="grey", linestyle="--", linewidth=1, label=f"all {num_experts} experts")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("selected experts")
    ax.set_title(f"{config.num_selected} experts selected over {len(layers)} MoE layers", fontsize=10)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# --- specialisation statistics (ESFT's premise, measured) ---------------------------------------
# All on token scores, which sum to 1 per layer: a distribution of the task's routing slots.


def effective_experts(scores: ExpertScores) -> list[float]:
    """Per layer, exp(entropy) of the task's token-score distribution: E for perfectly uniform
    routing, k for routing that always uses the same k experts."""
    result = []
    for row in scores.scores("token"):
        p = row[row > 0]
        result.append(float(np.exp(-(p * np.log(p)).sum())))
    return result


def selection_jaccard(a: list[set[int]], b: list[set[int]]) -> float:
    """Jaccard similarity of two whole selections, as sets of (layer, expert) pairs."""
    pairs_a = {(layer, e) for layer, experts in enumerate(a) for e in experts}
    pairs_b = {(layer, e) for layer, experts in enumerate(b) for e in experts}
    union = pairs_a | pairs_b
    return len(pairs_a & pairs_b) / len(union) if union else 0.0


def routing_mass_ratio(task: ExpertScores, reference: ExpertScores, top_p: float = 0.2) -> list[float]:
    """Per layer, how much more of the task's routing than of the reference's (e.g. the general
    domain) goes to the task's token p = `top_p` selection: 1 when the selected experts are just
    busy experts, much more when they are the task's own."""
    task_LE, reference_LE = task.scores("token"), reference.scores("token")
    ratios = []
    for layer, selected in enumerate(experts_sets(task, "token", top_p)):
        chosen = sorted(selected)
        ratios.append(float(task_LE[layer, chosen].sum() / max(reference_LE[layer, chosen].sum(), 1e-12)))
    return ratios


def save_domain_heatmaps(scores_by_domain: dict[str, ExpertScores], path: Path, top_p: float = 0.2) -> Path:
    """One panel per domain (layers x experts, token scores), the token p = `top_p` selection
    outlined in red: different tasks lighting up different experts is ESFT's premise."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = list(scores_by_domain)
    first = scores_by_domain[domains[0]]
    fig, axes = plt.subplots(len(domains), 1,
                             figsize=(max(8.0, 0.16 * first.num_experts + 2),
                                      1.1 + 0.9 * len(domains) * (0.4 + 0.15 * len(first.layers))),
                             squeeze=False)
    for ax, domain in zip(axes[:, 0], domains):
        scores = scores_by_domain[domain]
        matrix = scores.scores("token")
        image = ax.imshow(matrix, aspect="auto", cmap="viridis", interpolation="nearest", vmin=0)
        for row, chosen in enumerate(experts_sets(scores, "token", top_p)):
            for expert in chosen:
                ax.add_patch(plt.Rectangle((expert - 0.5, row - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.0))
        ax.set_yticks(range(len(scores.layers)), [str(layer) for layer in scores.layers], fontsize=7)
        ax.set_ylabel(domain, fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
        fig.colorbar(image, ax=ax, pad=0.01)
    axes[-1, 0].set_xlabel(f"routed expert (token scores; red = selected at token p={top_p}; rows = MoE layers)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
