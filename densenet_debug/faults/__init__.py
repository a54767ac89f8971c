"""Planted faults: historical backend bugs as backend modifiers, the self-test, and the convergence canary.

``registry`` names the faults and plants them; ``ops`` holds their arithmetic; ``selftest`` checks that the
toolkit catches each; ``canary`` trains a small DenseNet clean and with pytorch#708 planted.
"""
