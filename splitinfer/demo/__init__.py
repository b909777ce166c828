"""`splitinfer demo`: the whole system on this machine in about a minute.

    splitinfer demo                      # tinycnn-digits on held-out digits, ~75 s in all
    splitinfer demo --quick --json       # a shorter run, plus a JSON summary on stdout

What runs (all real processes, torn down on exit, Ctrl-C and failure):

- a **cloud worker** (``splitinfer cloud``, advertised over mDNS) and an **edge driver**
  (``python -m splitinfer.demo.driver CONFIG``: an :class:`EdgeAgent` with ``cut="auto"``,
  a deadline and the distilled student as fallback, that finds the worker through
  zeroconf and prints one JSON line per answered request);
- the **link** between them: as root, two network namespaces joined by a veth pair
  (:class:`NetnsLab`) shaped with ``tc tbf``, so mDNS and every byte cross the shaped veth;
  otherwise both on 127.0.0.1 and the edge process delays each send by bytes / bandwidth
  (a FIFO uplink, :class:`UplinkLimiter`, as the agent's ``before_send`` hook). The demo
  says which one it uses;
- a **schedule** this process drives: the bandwidth steps fast → slow → fast (→ slow), and
  while the edge is on the cloud the worker is stopped (SIGKILL by default) and a new one
  started, which the edge finds over mDNS again.

This process renders the edge's lines live (rich), then prints a summary table, writes a
PNG timeline (matplotlib, Agg) and, with ``--json``, a JSON summary on stdout.

Why the edge is emulated slower: the reference profiles (partitions/) are of one 2-core
machine, where a small model runs whole on the edge at any bandwidth, so the adaptive cut
would never move. The demo picks the smallest factor K (1, 2, 5, 10, ...) for which a
cloud cut wins below a few Mbit/s, has the agent plan with the edge profile scaled by K
(``AgentConfig.edge_slowdown``), pads every head run on the edge to the time that profile
gives it (and every fallback run to K times its median here) through the agent's hooks,
and says so. The bandwidth steps are then placed well above and below the cost model's
crossover for that K.

The modules: plan (what the run will do), link (tc or the in-process limiter), processes
(the children), driver + edge_hooks (the edge side), record + run (the schedule and what
it saw), display (the live view), summary (summary and plot), cli (``demo_cmd``).
"""
