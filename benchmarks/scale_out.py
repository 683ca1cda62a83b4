"""Generation throughput on a simulated multi-node GPU cluster: scaling efficiency and where the time goes.

The cluster is `tests/sim_cluster.py`'s: a head plus worker nodes on loopback, each a raylet declaring
2 "GPUs" that Ray schedules like real ones. The model is the `sleep:<ms>` stand-in: each UNet call
waits `--delay-ms` and uses no CPU, as a GPU kernel does from the host's side, while everything around
it is real (VAE decode, CLIP/IQA scoring, 512 px JPEG encoding, Parquet shards, the manifest).
A model time that dominates the CPU cost, as on real GPUs, makes the result a property of lbgen's
pipeline rather than of this machine's 2 cores; `--delay-ms 0` measures the pipeline's own ceiling.

For each N in `--gpus`, N generation actors (one per simulated GPU, spread over the nodes) make
N classes x `--images-per-gpu` images, in whole batches. The rate is the steady one: the images
landing after the N-th shard (every actor past its start-up) over the time from it to the last.

    python benchmarks/scale_out.py --json scale_out.json

`--straggler F`: instead, four nodes of one simulated GPU each, one of them F times as fast as the others
(its UNet waits 1/F as long: an L4 beside A10Gs, a throttled GPU). Its `straggler_efficiency` is the
four-GPU throughput over the sum of the four GPUs' own rates, each measured alone on a one-node cluster
(a fast GPU, the slow one). The rate here is the whole run's after its first shard, tail included, since
a straggler costs most at the end, when the others wait for its last batches.

    python benchmarks/scale_out.py --straggler 0.25 --json straggler.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the simulated cluster is the tests' own

from common import json_header  # noqa: E402
from sim_cluster import simulated_cluster  # noqa: E402

from lbgen.config import resolve  # noqa: E402
from lbgen.data.format import DATA_DIR  # noqa: E402
from lbgen.models.generator import SLEEP_SLOWDOWN_ENV  # noqa: E402


def config(output: Path, gpus: int, args):
    """N classes of `--images-per-gpu` images for N actors: every actor makes the same whole batches."""
    table = output.parent / f"classes-{gpus}.txt"
    table.write_text("".join(f"n{i:08d} class {i}\n" for i in range(gpus)))
    return resolve("tiny", overrides={
        "classes": str(table),
        "model": {"generator": f"sleep:{args.delay_ms}", "resolution": args.resolution},
        "generate": {"output": str(output), "use_gpu": True, "workers": gpus, "images_per_class": args.images_per_gpu,
                     "rows_per_shard": args.rows_per_shard, "batch_size": args.batch_size, "micro_batch": args.batch_size,
                     "steps": args.steps, "image_format": "jpeg", "cpus_per_worker": args.cpus_per_actor,
                     "score_beside": not args.separate_scoring},
    })


def operator_seconds(ds) -> dict:
    """Summed wall and CPU seconds per Ray Data operator of a finished run (model, scoring, encode, ...),
    and the driver's object-store fetch time ("get": the image bytes reaching the shard writer)."""
    out, summaries = {}, [ds._get_stats_summary()]
    while summaries:
        summary = summaries.pop()
        for op in summary.operators_stats:
            out[op.operator_name] = {"wall_s": round(op.wall_time.sum if op.wall_time else 0.0, 2),
                                     "cpu_s": round(op.cpu_time.sum if op.cpu_time else 0.0, 2),
                                     "output_bytes": op.output_size_bytes.sum if op.output_size_bytes else 0}
        summaries.extend(summary.parents)
    out["driver object-store get"] = {"wall_s": round(ds._get_stats_summary().iter_stats.get_time.get(), 2)}
    return out


def steady_rate(output: Path, gpus: int) -> float:
    """Images per second after the first round: from the N-th shard landing (each of the N actors has
    delivered its first batch: start-up is over) to the last, over the images that landed in between."""
    import pyarrow.parquet as pq

    shards = sorted((output / DATA_DIR).glob("train-*.parquet"), key=lambda p: p.stat().st_mtime)
    rows = sum(pq.read_metadata(p).num_rows for p in shards[gpus:])
    return rows / (shards[-1].stat().st_mtime - shards[gpus - 1].stat().st_mtime)


def rate_after_first_shard(output: Path) -> float:
    """Images per second from the first shard landing (start-up over) to the last, over the images after it."""
    import pyarrow.parquet as pq

    shards = sorted((output / DATA_DIR).glob("train-*.parquet"), key=lambda p: p.stat().st_mtime)
    rows = sum(pq.read_metadata(p).num_rows for p in shards[1:])
    return rows / (shards[-1].stat().st_mtime - shards[0].stat().st_mtime)


def straggler(args, tmp: Path) -> dict:
    """One slow GPU of four (see the module docstring): its efficiency, and each GPU's rate alone."""
    slow_env = {SLEEP_SLOWDOWN_ENV: str(1 / args.straggler)}
    alone = {}
    for name, env, images in (("fast GPU alone", None, args.images_per_gpu), ("slow GPU alone", slow_env, max(8, round(args.images_per_gpu * args.straggler)))):
        with simulated_cluster(workers=1, gpus_per_node=1, cpus_per_node=1, node_env={0: env} if env else None):
            run_args = argparse.Namespace(**{**vars(args), "images_per_gpu": images})
            run = run_once(tmp / name.replace(" ", "-"), 1, run_args)
            alone[name] = {**run, "images_per_s": round(rate_after_first_shard(tmp / name.replace(" ", "-")), 3)}
    ideal = 3 * alone["fast GPU alone"]["images_per_s"] + alone["slow GPU alone"]["images_per_s"]
    with simulated_cluster(workers=4, gpus_per_node=1, cpus_per_node=1, node_env={0: slow_env}):
        mixed = run_once(tmp / "mixed", 4, args)
    mixed["images_per_s"] = round(rate_after_first_shard(tmp / "mixed"), 3)
    return {"alone": list(alone.values()), "mixed": mixed, "sum_of_rates": round(ideal, 3),
            "straggler_efficiency": round(mixed["images_per_s"] / ideal, 3)}


def run_once(output: Path, gpus: int, args) -> dict:
    """One generation with `gpus` actors through `lbgen.stages.generate`'s own driver loop, timed in its parts."""
    import ray

    from lbgen.data.writer import DatasetWriter
    from lbgen.stages.generate import build_pipeline, check_inputs, dataset_plan, write_dataset

    cfg = config(output, gpus, args)
    table, lora = check_inputs(cfg)
    plan = dataset_plan(cfg, table, lora)
    ray.data.DataContext.get_current().enable_progress_bars = False
    start, cpu_start, in_writer = time.perf_counter(), driver_cpu_s(), [0.0]
    with DatasetWriter.open(output, plan, config=dataclasses.asdict(cfg), run={}) as writer:
        for name in ("add_parts", "commit"):  # the driver's own work per batch and per shard, timed
            setattr(writer, name, timed(getattr(writer, name), in_writer))
        ds = build_pipeline(cfg, table, writer.todo, "cpu", gpus=True, parts=writer.part_settings())
        manifest = write_dataset(writer, ds, show_progress=False)
    driver_cpu = driver_cpu_s() - cpu_start
    images = manifest["totals"]["rows"]
    model_s = images / args.batch_size * args.steps * args.delay_ms / 1000
    operators = operator_seconds(ds)
    # Every operator's output blocks go through Ray's object store (the last one's to the driver).
    store_bytes = sum(op.get("output_bytes", 0) for op in operators.values()) / images
    return {
        "gpus": gpus, "images": images, "seconds": round(time.perf_counter() - start, 2),
        "images_per_s": round(steady_rate(output, gpus), 3),
        "driver_cpu_s_per_1000_images": round(driver_cpu / images * 1000, 3),
        "driver_writer_s_per_1000_images": round(in_writer[0] / images * 1000, 3),
        "time": {"model_s (summed over actors)": round(model_s, 2), "operators": operators},
        "object_store_bytes_per_image": round(store_bytes),
    }


def timed(method, total: list[float]):
    """`method`, adding the seconds each call takes to `total[0]`."""
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            total[0] += time.perf_counter() - start
    return wrapper


def driver_cpu_s() -> float:
    """CPU seconds of this process (the driver: Ray Data's executor threads included), user and system."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", default="1,2,4,8", help="simulated GPU counts to measure (default: 1,2,4,8)")
    parser.add_argument("--nodes", type=int, default=4, help="worker nodes, 2 GPUs each (default: 4)")
    parser.add_argument("--delay-ms", type=int, default=8000, help="model time per UNet call of a micro-batch (default: 8000)")
    parser.add_argument("--steps", type=int, default=2, help="denoising steps, UNet calls per micro-batch (default: 2)")
    parser.add_argument("--batch-size", type=int, default=4, help="images per actor call and per micro-batch (default: 4)")
    parser.add_argument("--images-per-gpu", type=int, default=16, help="images per simulated GPU (default: 16)")
    parser.add_argument("--rows-per-shard", type=int, default=4, help="rows per shard (default: 4)")
    parser.add_argument("--resolution", type=int, default=512, help="image side in pixels (default: 512)")
    parser.add_argument("--cpus-per-actor", type=float, default=0.1, help="CPUs Ray reserves per generation actor (default: 0.1)")
    parser.add_argument("--no-ceiling", action="store_true", help="skip the pipeline-ceiling run (model time 0)")
    parser.add_argument("--separate-scoring", action="store_true", help="score in a separate actor pool (generate.score_beside false)")
    parser.add_argument("--straggler", type=float, help="measure one GPU of four running at this fraction of the others' speed")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    results = json_header()
    if args.straggler:
        with tempfile.TemporaryDirectory() as tmp:
            results.update(straggler(args, Path(tmp)))
        print(json.dumps({"straggler_efficiency": results["straggler_efficiency"], "sum_of_rates": results["sum_of_rates"],
                          "mixed_images_per_s": results["mixed"]["images_per_s"]}))
        if args.json:
            args.json.write_text(json.dumps(results, indent=1) + "\n")
        return
    counts = [int(n) for n in args.gpus.split(",")]
    with tempfile.TemporaryDirectory() as tmp, simulated_cluster(workers=args.nodes, gpus_per_node=2, cpus_per_node=1):
        runs = {n: run_once(Path(tmp) / f"n{n}", n, args) for n in counts}
        for n, run in runs.items():
            print(json.dumps(run), flush=True)
        base = runs[counts[0]]["images_per_s"] / counts[0]
        results["runs"] = list(runs.values())
        results["efficiency"] = {str(n): round(runs[n]["images_per_s"] / (n * base), 3) for n in counts[1:]}
        if not args.no_ceiling:
            ceiling_args = argparse.Namespace(**{**vars(args), "delay_ms": 0})
            top = max(counts)
            results["ceiling"] = run_once(Path(tmp) / "ceiling", top, ceiling_args)
            results["ceiling_images_per_s"] = results["ceiling"]["images_per_s"]
    print(json.dumps({k: results[k] for k in ("efficiency", "ceiling_images_per_s") if k in results}))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
