"""Run `onpolicy <args>` in this process while recording which config fields the run reads (test helper:
tests/test_structure.py). Reads made by dataclasses, OmegaConf and config.py's own checks do not count:
checking a key is not using it."""

import dataclasses
import json
import sys

import onpolicy.config as config

SKIP = ("dataclasses.py", "omegaconf", "/onpolicy/config.py", "copy.py", "typing.py", "pprint.py",
        "reprlib.py")
READ: set = set()


def record(cls) -> None:
    names = {f.name for f in dataclasses.fields(cls)}
    original = object.__getattribute__

    def getattribute(self, name):
        if name in names:
            # (not inside a generator: that would be a frame of its own)
            caller = sys._getframe(1).f_code.co_filename
            if not any(s in caller for s in SKIP):
                READ.add(f"{cls.__name__}.{name}")
        return original(self, name)

    cls.__getattribute__ = getattribute


if __name__ == "__main__":
    from onpolicy.sampling import SamplerConfig

    for value in [*vars(config).values(), SamplerConfig]:
        if (isinstance(value, type) and dataclasses.is_dataclass(value)
                and value.__module__.startswith("onpolicy")):
            record(value)
    from onpolicy.cli import main

    code = main(sys.argv[2:])
    with open(sys.argv[1], "w") as f:
        json.dump(sorted(READ), f)
    sys.exit(code)
