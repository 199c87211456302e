# As Nova's own unit tests (nova/tests/unit/__init__.py): monkey patch the
# way nova-compute does before anything else is imported, then load the
# versioned objects.
from nova import monkey_patch; monkey_patch.patch()  # noqa: E702,I001

from nova import objects  # noqa: E402

objects.register_all()
