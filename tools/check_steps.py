"""What the GPU check scripts share: running a command line with a deadline, and running
named steps so that one failure is reported without stopping the others."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
from typing import Any, Callable, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(command: list[str], timeout: float, env: Optional[dict[str, str]] = None) -> str:
  """Run ``command`` in the repository, echoing it and the tail of its output; its stdout.
  RuntimeError (with its last stderr line) on a non-zero exit."""
  print('$', ' '.join(command), flush=True)
  result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
  sys.stderr.write(result.stderr[-4000:])
  print(result.stdout[-4000:], flush=True)
  if result.returncode:
    raise RuntimeError(f'{os.path.basename(command[1])} exited with {result.returncode}: '
                       f'{(result.stderr.strip().splitlines() or [""])[-1]}')
  return result.stdout


def run_steps(out: str, steps: dict[str, Callable[[], Any]], summary: dict[str, Any],
              markdown: Callable[[dict[str, Any]], str]) -> int:
  """Run the steps in order, each result under its name in ``summary`` (a failure under
  ``summary['failures']``, and the next step still runs); write summary.json and
  summary.md into ``out`` and print the latter. The exit status: 1 if a step failed."""
  summary.setdefault('date', time.strftime('%Y-%m-%d %H:%M', time.gmtime()))
  summary['failures'] = {}
  for step, function in steps.items():
    start = time.perf_counter()
    try:
      summary[step] = function()
    except Exception as e:  # noqa: BLE001 -- report it, go on with the next step
      traceback.print_exc()
      summary['failures'][step] = f'{type(e).__name__}: {e}'
    summary[f'{step}_seconds'] = round(time.perf_counter() - start, 1)
  with open(os.path.join(out, 'summary.json'), 'w') as f:
    json.dump(summary, f, indent=1, default=str)
  text = '\n'.join([markdown(summary), ''] + [
      f'FAILED {step}: {error}' for step, error in summary['failures'].items()])
  with open(os.path.join(out, 'summary.md'), 'w') as f:
    f.write(text + '\n')
  print(text, flush=True)
  return 1 if summary['failures'] else 0
