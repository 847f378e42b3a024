"""main.py under torchrun with faults for tests/test_elastic.py (elastic restarts, several nodes).

Started like main.py (`torchrun ... tests/elastic_probe.py FLAGS`); the environment picks the faults:

PROBE_KILL_AFTER_STEP  on torchrun's first attempt only (TORCHELASTIC_RESTART_COUNT 0), rank
                       PROBE_KILL_RANK (default 1) SIGKILLs itself right after that optimizer step
                       (and its checkpoint, if one was due): a worker lost at a known place
PROBE_SLEEP_AFTER_STEP on the first attempt only, rank PROBE_SLEEP_RANK (default 0) sleeps right after
                       that optimizer step, outside any collective, until torchrun stops it (60 s at
                       most): a worker busy on another node (a long GPU step) when its peer dies
PROBE_FIRST_MARK       a file: the first attempt is the one that finds it missing at start (the killed
                       rank writes it), for a node whose agent restarts its workers without counting
                       (TORCHELASTIC_RESTART_COUNT stays 0 there)
PROBE_UNSHARED_RANK    that rank looks for rank 0's token in a folder of its own, as a node that
                       does not share the checkpoint folder would
"""

import os
import signal
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def install_hooks():
    import distributed
    import trainer

    kill_step = os.environ.get("PROBE_KILL_AFTER_STEP")
    sleep_step = os.environ.get("PROBE_SLEEP_AFTER_STEP")
    mark = os.environ.get("PROBE_FIRST_MARK")
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0" and not (mark and os.path.exists(mark))
    if kill_step and first_attempt and os.environ["RANK"] == os.environ.get("PROBE_KILL_RANK", "1"):
        save_if_due = trainer.Trainer.save_if_due

        def killing_save_if_due(self, *args):
            save_if_due(self, *args)
            if self.scheduler.last_epoch == int(kill_step):
                if mark:
                    open(mark, "w").close()
                os.kill(os.getpid(), signal.SIGKILL)

        trainer.Trainer.save_if_due = killing_save_if_due

    if sleep_step and first_attempt and os.environ["RANK"] == os.environ.get("PROBE_SLEEP_RANK", "0"):
        save_if_due_then = trainer.Trainer.save_if_due

        def sleeping_save_if_due(self, *args):
            save_if_due_then(self, *args)
            deadline = time.monotonic() + 60
            while (
                self.scheduler.last_epoch == int(sleep_step)
                and self.stop.signal is None
                and time.monotonic() < deadline
            ):
                time.sleep(0.1)  # until torchrun's agent stops it (SIGTERM), as it would a long step

        trainer.Trainer.save_if_due = sleeping_save_if_due

    if os.environ.get("PROBE_UNSHARED_RANK") == os.environ.get("RANK"):
        distributed.token_visible = lambda path: False
        distributed.SHARED_FOLDER_WAIT = 0


if __name__ == "__main__":
    install_hooks()
    import main

    sys.exit(main.main())
