"""A training run's folder (--out) over its life: resume or start, tidy it,
append the metrics.

The file names and the generic checks (writable, temporary files left by a
kill) are files/rundir.py's; this is what training decides with them: the
same command again resumes, and nothing replaces another run's files
without --overwrite.
"""
import json
import os

from ..errors import ConfigError
from ..files.rundir import (BEST_NAME, LATEST_NAME, METRICS_NAME, RUN_FILES, check_out_dir,
                            read_metrics, remove_if_present, remove_stale_temp_files)
from ..files.tensorfile import TensorFile


class RunFolder:
    def __init__(self, out):
        check_out_dir(out)
        self.out = out
        self.latest_path = os.path.join(out, LATEST_NAME)
        self.best_path = os.path.join(out, BEST_NAME)
        self.metrics_path = os.path.join(out, METRICS_NAME)

    def decide_resume(self, init_from, identity, overwrite, log):
        """Continue the run in the folder (True), or start one (False); refuse
        to replace another run.

        The same command again resumes (with --init-from too, when the saved
        run was started from the same source). Anything else that would replace
        a run's files needs overwrite (--overwrite). identity: this run's
        (state.identity), to recognise a start killed before its first save.
        """
        out = self.out
        present = [n for n in RUN_FILES if os.path.exists(os.path.join(out, n))]
        if not present or overwrite:
            return False
        how = "use another --out, or --overwrite to replace it"
        if LATEST_NAME in present:
            with TensorFile(self.latest_path) as f:
                saved = f.meta
            started_from = saved.get("init_from")
            if init_from is None or init_from == started_from:
                return True
            origin = f"started from {started_from}" if started_from else "trained from scratch"
            raise ConfigError(f"--out {out} already holds another run ({origin}, "
                              f"{saved.get('iter', '?')} iterations); starting from "
                              f"{init_from} would replace it: {how}")
        # Run files but no training state: a run killed before its first save
        # (the same command starts it again) or the remains of another one.
        if os.path.isfile(self.best_path):
            with TensorFile(self.best_path) as f:
                saved = f.meta
            if saved.get("train_config") == identity and saved.get("init_from") == init_from:
                log(f"note: {out} holds the start of this same run, stopped before its "
                    f"first training state was saved: starting it again")
                return False
        raise ConfigError(f"--out {out} holds files of another run ({', '.join(present)}) and "
                          f"no training state to resume: {how}")

    def prepare(self, resume, overwrite, last_eval_iter):
        """Create the folder, or tidy it for a resumed run (rank 0 only)."""
        out = self.out
        try:
            os.makedirs(out, exist_ok=True)
        except OSError as err:
            raise ConfigError(f"cannot use --out {out}: {err.strerror or err}") from None
        remove_stale_temp_files(out)
        if overwrite:
            for name in RUN_FILES:
                remove_if_present(os.path.join(out, name))
        if resume:
            # Evaluations the saved state has not seen will be redone: drop their rows.
            rows = [r for r in read_metrics(self.metrics_path)
                    if r.get("iter", -1) <= last_eval_iter]
            with open(self.metrics_path + ".tmp", "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
            os.replace(self.metrics_path + ".tmp", self.metrics_path)
        elif os.path.exists(self.metrics_path):
            os.remove(self.metrics_path)    # this same run, started again

    def append_metrics(self, entry):
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(entry) + "\n")
