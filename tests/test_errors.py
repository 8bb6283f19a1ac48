"""Every error the project raises on purpose survives pickling, as Ray sends a worker's
error to the driver: a user then sees the one-line `error:`, not a deserialisation failure."""

from __future__ import annotations

import importlib
import pickle
import pkgutil

import pytest

import autobatch
import launcher
from autobatch.errors import AutobatchError, NoFitError


def _all_errors() -> list[type[BaseException]]:
    for pkg in (autobatch, launcher):
        for mod in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
            if mod.name.endswith(("causal_lm", "lm_example", "example", "serve")):
                continue  # optional extra / runs on import; their errors are plain subclasses
            importlib.import_module(mod.name)
    found, todo = [], [AutobatchError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return found


def _instance(cls: type[BaseException]) -> BaseException:
    if cls is NoFitError:
        return NoFitError("small: one sample does not fit", measured_steps=2)
    if cls.__name__ == "InvalidSpec":
        return cls("invalid job spec: x: bad", [{"loc": ["x"], "msg": "bad"}])
    return cls("a message naming the field")


@pytest.mark.parametrize("cls", _all_errors(), ids=lambda c: c.__name__)
def test_error_survives_pickling_with_its_fields(cls):
    exc = _instance(cls)
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is cls
    assert str(back) == str(exc)
    assert vars(back) == vars(exc)  # measured_steps, errors, ...


def test_error_list_is_not_empty():
    names = {c.__name__ for c in _all_errors()}
    assert {"NoFitError", "InvalidSpec", "SpecError", "TaskError", "LaunchError"} <= names


def test_every_error_raised_in_a_ray_actor_reaches_the_driver_as_itself():
    import ray
    from ray.exceptions import RayTaskError

    @ray.remote(num_cpus=0)
    class Raiser:
        def boom(self, exc: BaseException) -> None:
            raise exc

    ray.init(address="local", num_cpus=1, include_dashboard=False, object_store_memory=100 * 2**20)
    try:
        actor = Raiser.remote()
        for cls in _all_errors():
            exc = _instance(cls)
            with pytest.raises(RayTaskError) as raised:
                ray.get(actor.boom.remote(exc))
            assert type(raised.value.cause) is cls, cls  # not UnserializableException
            assert vars(raised.value.cause) == vars(exc)
    finally:
        ray.shutdown()
