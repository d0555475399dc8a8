"""Turn a pytest-benchmark JSON file into the ratio tables of benchmarks/README.md:

    pytest benchmarks/ --benchmark-only --benchmark-json=benchmarks/results.json
    python benchmarks/report.py benchmarks/results.json

Ratios use each benchmark's minimum time (the least disturbed by other load on a shared machine), taken
from the same run, so the ratio compares implementations under the same conditions."""

import argparse
import json
from collections import defaultdict


def load(path: str) -> tuple[dict[str, dict[str, dict]], list[dict]]:
    """(group -> impl -> benchmark, every benchmark)."""
    benches = json.load(open(path))["benchmarks"]
    groups: dict[str, dict[str, dict]] = defaultdict(dict)
    for bench in benches:
        groups[bench["group"]][bench["extra_info"].get("impl", bench["name"])] = bench
    return groups, benches


def ratio(group: dict[str, dict], a: str, b: str) -> str:
    if a in group and b in group:
        return f"{group[a]['stats']['min'] / group[b]['stats']['min']:.2f}"
    return "-"


def ms(group: dict[str, dict], impl: str) -> str:
    return f"{group[impl]['stats']['min'] * 1e3:.1f}" if impl in group else "-"


def main(path: str) -> None:
    groups, benches = load(path)
    presets = ["tiny", "small", "reference"]
    devices = sorted({b["extra_info"].get("device", "cpu") for g in groups.values() for b in g.values()})
    print("| condition block | batch | fwd ours (ms) | fwd ours/literal | fwd ours/bare | fwd+bwd ours (ms) | fwd+bwd ours/literal | fwd+bwd ours/bare |")
    print("|---|---|---|---|---|---|---|---|")
    for device in devices:
        for preset in presets:
            f, t = groups.get(f"block forward {preset} {device}", {}), groups.get(f"block forward+backward {preset} {device}", {})
            if f or t:
                batch = next(iter((f or t).values()))["extra_info"]["batch"]
                print(
                    f"| {preset} {device} | {batch} | {ms(f, 'ours')} | {ratio(f, 'ours', 'literal')} | {ratio(f, 'ours', 'bare')} | {ms(t, 'ours')} | {ratio(t, 'ours', 'literal')} | {ratio(t, 'ours', 'bare')} |"
                )
    bf16 = groups.get("block forward+backward reference cuda bf16", {})
    if bf16:
        print(f"| reference cuda bf16 | 16 | | | | {ms(bf16, 'ours')} | {ratio(bf16, 'ours', 'literal')} | |")
    print()
    print(
        "| condition block, interleaved (the four called in turn; medians of per-round ratios) | fwd ours/literal | fwd ours/bare | fwd timm/bare | fwd+bwd ours/literal | fwd+bwd ours/bare | fwd+bwd timm/bare |"
    )
    print("|---|---|---|---|---|---|---|")
    pairs = ("ours/literal", "ours/bare", "timm/bare")
    for preset in presets:
        f = groups.get("block interleaved forward", {}).get(preset)
        t = groups.get("block interleaved forward+backward", {}).get(preset)
        if f or t:
            cells = [f"{b['extra_info'][p]:.2f}" if b else "-" for b in (f, t) for p in pairs]
            rounds = (f or t)["extra_info"]["rounds"]
            print(f"| {preset} cpu ({rounds} rounds) | {' | '.join(cells)} |")
    print()
    print("| model forward | batch | ours (ms) | timm ViT (ms) | ours/timm time | throughput ours/timm | linear head/timm time |")
    print("|---|---|---|---|---|---|---|")
    for device in devices:
        for preset in presets:
            for part in ("encoder", "decoder"):
                g = groups.get(f"{part} forward {preset} {device}", {})
                if g:
                    r = ratio(g, "ours", "timm")
                    inv = f"{1 / float(r):.2f}" if r != "-" else "-"
                    print(f"| {part} {preset} {device} | {g['ours']['extra_info']['batch']} | {ms(g, 'ours')} | {ms(g, 'timm')} | {r} | {inv} | {ratio(g, 'linear head', 'timm')} |")
    print()
    for name, g in sorted(groups.items()):
        if name.startswith("encode+quantize"):
            images = g["ours"]["extra_info"]["images"]
            print(f"- {name}: {images / g['ours']['stats']['min']:.0f} images/s ({images} images, K = 1024 k-means)")
        if name.startswith("stage-2 step"):
            print(f"- {name}: encoder every step / cached codes = {ratio(g, 'encoder every step', 'cached codes')} (cached {ms(g, 'cached codes')} ms per step)")
        if name.endswith("compile"):
            print(f"- {name}: compiled/eager time {ratio(g, 'compiled', 'eager')} (eager {ms(g, 'eager')} ms, compiled {ms(g, 'compiled')} ms)")
    km = groups.get("k-means K=8192 720k x 16 cpu", {})
    if km:
        print()
        print("| k-means, K = 8192, 720k x 16, 10 iterations | time (s) | time / faiss | final MSE |")
        print("|---|---|---|---|")
        for impl in ("ours", "faiss", "torch", "ours k-means++"):
            if impl in km:
                print(f"| {impl} | {km[impl]['stats']['min']:.1f} | {ratio(km, impl, 'faiss')} | {km[impl]['extra_info']['mse']:.4f} |")
    assign = groups.get("assignment 200k x 16 to K=8192 cpu", {})
    if assign:
        print()
        for impl, bench in assign.items():
            print(f"- assignment to K = 8192, {impl}: {bench['extra_info']['vectors'] / bench['stats']['min'] / 1e6:.2f} M vectors/s")
    print()
    print("| training step (AdamW, fp32) | batch | peak memory (MB) | step time (s) |")
    print("|---|---|---|---|")
    memory = [b for b in benches if b["group"].startswith("train step memory")]
    for bench in sorted(memory, key=lambda b: (b["extra_info"]["device"], presets.index(b["extra_info"]["preset"]))):
        e = bench["extra_info"]
        print(f"| {e['preset']} {e['device']} | {e['batch']} | {e['peak_mb']:,.0f} | {e['step_s']:.2f} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Print benchmarks/README.md's ratio tables from a pytest-benchmark JSON file.")
    parser.add_argument("results", nargs="?", default="benchmarks/results.json", help="pytest --benchmark-json output (default: %(default)s)")
    main(parser.parse_args().results)
