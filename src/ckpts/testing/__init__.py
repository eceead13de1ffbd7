"""Tools that test a training script with ckpts: does it resume exactly?

Example:
    >>> from ckpts.testing import check_resume
    >>> result = check_resume(["python", "train.py", "--run", "{run}"])  # doctest: +SKIP
"""

from ckpts.testing._resume_check import ResumeCheck, check_resume

__all__ = ["ResumeCheck", "check_resume"]
