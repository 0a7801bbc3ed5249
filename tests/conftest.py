import logging
import os
import sys

import pytest
import torch

# Offline by construction: nothing in the suite may reach the Hugging Face Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))  # tests/helpers.py

# Loggers that in-process runs of the example scripts and the CLI configure: transformers' and datasets'
# verbosity and format, Cuttlefish's level, the scripts' own loggers.
_LIBRARY_LOGGERS = ("transformers", "datasets", "cuttlefish_hf", "run_glue", "vision_train_example", "__main__")


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny tensors: one intra-op thread avoids multi-second MKL/OpenMP stalls when the two CPUs are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _restore_process_state():
    """Put back what a script's ``main`` run in this process sets for the whole process (log levels, handlers and
    formats, environment variables, working directory, torch threads), so that no test sees another's."""
    loggers = [logging.getLogger(name) for name in _LIBRARY_LOGGERS]
    saved = [(logger, logger.level, logger.propagate, list(logger.handlers),
              [handler.formatter for handler in logger.handlers]) for logger in loggers]
    root_level, environ, cwd, threads = logging.root.level, dict(os.environ), os.getcwd(), torch.get_num_threads()
    yield
    for logger, level, propagate, handlers, formatters in saved:
        logger.setLevel(level)
        logger.propagate = propagate
        logger.handlers[:] = handlers
        for handler, formatter in zip(handlers, formatters):
            handler.setFormatter(formatter)
    logging.root.setLevel(root_level)  # pytest swaps the root's handlers around each test phase: left to it
    if os.environ != environ:
        os.environ.clear()
        os.environ.update(environ)
    os.chdir(cwd)
    torch.set_num_threads(threads)
