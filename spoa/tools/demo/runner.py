"""One demo run: the Stack started, the view driven each tick, everything
stopped, the JSON summary printed. Apart from stack.py so that the stack
knows nothing of the view and the summary that read it."""

from __future__ import annotations

import asyncio
import json
import signal
import sys

from .. import provision
from .stack import MAX_LBNODES, POLICIES, TICK_S, DemoOptions, Stack, StartError
from .summary import build_summary
from .view import make_view


async def _main(opts: DemoOptions, out) -> tuple[dict, int]:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    reason = {"stopped_by": "duration" if opts.duration else "interrupt"}

    def on_signal(sig: int) -> None:
        if not stop.is_set():
            reason["stopped_by"] = "interrupt" if sig == signal.SIGINT else signal.Signals(sig).name
            stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, on_signal, sig)

    stack = Stack(opts)
    view = make_view(opts, out)
    failure: str | None = None
    try:
        starter = asyncio.create_task(stack.start(view.progress))
        waiter = asyncio.create_task(stop.wait())
        await asyncio.wait([starter, waiter], return_when=asyncio.FIRST_COMPLETED)
        if not starter.done():  # Ctrl-C while starting
            starter.cancel()
            await asyncio.gather(starter, return_exceptions=True)
        else:
            waiter.cancel()
            starter.result()  # raises StartError
        if not stop.is_set():
            view.start()
            deadline = loop.time() + opts.duration if opts.duration else None
            while not stop.is_set():
                timeout = TICK_S if deadline is None else min(TICK_S, deadline - loop.time())
                try:
                    await asyncio.wait_for(stop.wait(), max(0.0, timeout))
                except asyncio.TimeoutError:
                    pass
                await stack.refresh()
                view.update(stack)
                if stack.failed():
                    reason["stopped_by"] = "error"
                    break
                if deadline is not None and loop.time() >= deadline:
                    break
    except StartError as exc:
        failure = str(exc)
        reason["stopped_by"] = "error"
    except Exception as exc:  # noqa: BLE001 - any bug: stop everything, report it
        import traceback

        failure = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
        reason["stopped_by"] = "error"
    finally:
        view.stopping()
        try:
            await stack.stop()
        finally:
            view.stop(stack)
    if failure:
        stack.errors.insert(0, failure)
    summary = build_summary(stack, reason["stopped_by"])
    keep = opts.keep or bool(summary["errors"])
    summary["work_dir"] = str(stack.tmp)  # configs, key, logs: kept with --keep or after an error
    summary["work_dir_kept"] = keep
    if keep:
        (stack.tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    stack.cleanup_dir(keep)
    return summary, 1 if summary["errors"] else 0


def run_demo(opts: DemoOptions) -> int:
    if opts.haproxy not in provision.LINES:
        print(f"spoa-lease demo: --haproxy must be one of {', '.join(provision.LINES)}", file=sys.stderr)
        return 2
    if opts.policy not in POLICIES:
        print(f"spoa-lease demo: --policy must be one of {', '.join(POLICIES)}", file=sys.stderr)
        return 2
    if not 1 <= opts.lbnodes <= MAX_LBNODES:
        print(f"spoa-lease demo: --lbnodes must be 1 to {MAX_LBNODES}, got {opts.lbnodes}", file=sys.stderr)
        return 2
    out = sys.stdout
    with asyncio.Runner() as runner:
        summary, code = runner.run(_main(opts, out))
    print(json.dumps(summary, sort_keys=False), file=out, flush=True)
    return code
