"""main.py under torchrun with faults for tests/test_elastic.py (elastic restarts, several nodes).

Started like main.py (`torchrun ... tests/elastic_probe.py FLAGS`); the environment picks the faults:

PROBE_KILL_AFTER_STEP  on torchrun's first attempt only (TORCHELASTIC_RESTART_COUNT 0), rank
                       PROBE_KILL_RANK (default 1) SIGKILLs itself right after that optimizer step
                       (and its checkpoint, if one was due): a worker lost at a known place
PROBE_UNSHARED_RANK    that rank looks for rank 0's token in a folder of its own, as a node that
                       does not share the checkpoint folder would
"""
import os
import signal
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def install_hooks():
    import distributed
    import trainer

    kill_step = os.environ.get("PROBE_KILL_AFTER_STEP")
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    if kill_step and first_attempt and os.environ["RANK"] == os.environ.get("PROBE_KILL_RANK", "1"):
        save_if_due = trainer.Trainer.save_if_due

        def killing_save_if_due(self, *args):
            save_if_due(self, *args)
            if self.scheduler.last_epoch == int(kill_step):
                os.kill(os.getpid(), signal.SIGKILL)

        trainer.Trainer.save_if_due = killing_save_if_due

    if os.environ.get("PROBE_UNSHARED_RANK") == os.environ.get("RANK"):
        distributed.token_visible = lambda path: False
        distributed.SHARED_FOLDER_WAIT = 0


if __name__ == "__main__":
    install_hooks()
    import main

    sys.exit(main.main())
