"""``make gpu-check``: the whole GPU path in one command, with one report.

    PYTHONPATH=. python3 -m dist_train.gpucheck [--out DIR] [--budget-s 470]

Runs every test marked ``gpu`` (pytest, JUnit results), then the GPU benchmarks each in its own
subprocess with a time limit (the host's dispatch cost per eager op of the GPT beside the planner's assumed
``host_op_us``, block kernel TFLOP/s vs SDPA, a ~1B Llama-style training step, the
longest trainable sequence by bisection, async checkpoint bandwidth and stall), and writes
``gpu-report.json`` and ``gpu-report.md`` to ``$OUT`` (else ``runs/gpu-check/``) after every section,
so a run cut short still reports what it did. Without CUDA the same command is a smoke test: the
tests skip with their reason and the benchmarks report "skipped: no CUDA device" (the dispatch one runs its
code on CPU, marked as a smoke).

Modules: ``env`` (the machine), ``bench`` (the benchmarks; ``python3 -m dist_train.gpucheck.bench``),
``dispatch`` (the host's cost per eager op),
``report`` (JSON and Markdown), ``runner`` (sections, time budget, exit status). Only torch and the
standard library are imported: deepspeed, megatron-core and ray are never needed.
"""
