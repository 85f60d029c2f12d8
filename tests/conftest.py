import functools
from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tests use tiny models, where a second thread only adds contention (and on a shared machine, a lot)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@functools.cache
def _has_module_fixture(path: Path) -> bool:
    return path.suffix == ".py" and 'scope="module"' in path.read_text()


@pytest.hookimpl(optionalhook=True, tryfirst=True)
def pytest_xdist_make_scheduler(config, log):
    """The default run (``-n 2``, pyproject.toml) spreads the tests over two pytest-xdist workers one by one, except
    that a module with a module-scoped fixture (a reference training run, a vLLM engine) goes to one worker whole,
    so that the fixture is built once. (``--dist loadgroup`` would do this with marks, but its marks do not reach
    the node ids under pytest 9.2.)"""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ModuleFixtureScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return module if _has_module_fixture(config.rootpath / module) else nodeid

    return ModuleFixtureScheduling(config, log)
