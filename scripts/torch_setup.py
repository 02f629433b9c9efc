"""Shared start of the transformers benchmark scripts: thread count, quiet logging, and a line on
stderr with the versions and the machine's load (timings taken under load are not comparable)."""

import os
import sys


def setup(threads):
    """Sets torch's threads, silences transformers' logging, reports versions and load."""
    import torch
    import transformers

    torch.set_num_threads(threads)
    transformers.utils.logging.set_verbosity_error()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"loadavg {os.getloadavg()[0]:.2f}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}",
          file=sys.stderr)
