"""Training batches that end in a Ctrl-C: a run killed in the middle (tests/test_resume.py, and
every process of tests/fsdp_recover.py)."""


class Interrupted(list):
    """The training batches, with a Ctrl-C after `after` of them."""

    def __init__(self, data, after):
        super().__init__(data)
        self.left = after

    def __iter__(self):
        for batch in super().__iter__():
            if self.left == 0:
                raise KeyboardInterrupt
            self.left -= 1
            yield batch
