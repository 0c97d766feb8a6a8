"""The steering node: BPF flow table (PASS, PARK, TO(host)), parking and replay, guard."""
