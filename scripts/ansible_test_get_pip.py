# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""Stand-in for the get-pip script that ansible-test bootstraps pip with.

ansible-test creates its virtual environments without pip and installs pip
into them by running a get-pip script downloaded from a host that is not
reachable here; it uses a cached copy at ~/.ansible/test/cache/get_pip_X_Y.py
when one exists. scripts/collection-tests installs this file there, with a pip
wheel from PyPI beside it. Like get-pip, it takes pip-install arguments plus
--no-setuptools/--no-wheel (which only mean "do not add those packages").
It runs pip straight from the wheel, so it needs neither ensurepip nor network
access beyond what pip itself uses.
"""

import os
import re
import subprocess
import sys

# scripts/collection-tests only replaces a cached script carrying this marker.
MARKER = 'composefs-fleet get-pip stand-in'


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    name = os.path.splitext(os.path.basename(__file__))[0]
    match = re.match(r'get_pip_(\d+(?:_\d+)*)$', name)
    if not match:
        sys.exit('%s: expected to be installed as get_pip_<version>.py, not %s' % (MARKER, name))
    version = match.group(1).replace('_', '.')
    wheel = os.path.join(here, 'pip-%s-py3-none-any.whl' % version)
    if not os.path.isfile(wheel):
        sys.exit('%s: %s is missing (scripts/collection-tests downloads it from PyPI)' % (MARKER, wheel))
    args = [arg for arg in sys.argv[1:] if arg not in ('--no-setuptools', '--no-wheel')]
    # The wheel is a zip that Python can run pip from directly.
    cmd = [sys.executable, os.path.join(wheel, 'pip'), 'install', '--find-links', here] + args
    sys.exit(subprocess.call(cmd))


if __name__ == '__main__':
    main()
