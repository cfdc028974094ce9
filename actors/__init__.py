"""One module per Ray role: rollout, policy, critic, reference, reward."""

import rlhf  # noqa: F401  (keeps a local Ray on loopback: must run before ray is imported)
