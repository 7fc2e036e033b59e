"""The fake Kubernetes API server now lives in `nvdp.testing.fake_apiserver` (where `nvdp demo --dra` can reach
it); the tests import it from here. Patch attributes on that module, not on this one: the server looks them up
there."""

from nvdp.testing.fake_apiserver import *  # noqa: F403
from nvdp.testing.fake_apiserver import _chunk  # noqa: F401
