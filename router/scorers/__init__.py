"""Selection plugins that need more than a candidate's load, one per module; importing this
package registers them with router/selection.py under their config names."""
from pdserve.router.scorers import prefix  # noqa: F401
