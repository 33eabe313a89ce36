"""Who owns a migrating container at each instant, and what each side does when it loses the
other: the migration's state machine, in one place.

One copy of the container may run at any instant, and only its owner runs it. The source
owns the container until the target commits; from the commit on, the target owns it. A side
that does not own it never lets its copy run: the source never thaws its tree after it told
the target to run (unless the target confirms that its copy is dead, or the user forces it),
and the target never lets a copy run that cannot get its memory.

The commit:
- stop-and-copy / offline: the target writes its commit (a durable tombstone, see
  target.py) *before* it thaws its copy on "resume";
- post-copy: the target's copy runs from "resume" on, but provisionally, on the source's
  behalf: its memory is still in the source's frozen tree, pulled page by page. The target
  commits once its lazy-pages daemon has every page (exit status 0). Until then, if the
  pages stop coming (lazy-pages fails, the source or the link is gone), the target kills its
  copy: it holds copies of lazy-pages' userfaultfds, so a missing page blocks the copy
  instead of reading as zeros, and cgroup.kill ends it. Its run is then discarded, as if that
  copy had crashed, and the source's tree resumes from the freeze (effects the discarded
  copy had outside, such as packets or files it wrote, stay).

    stage         owner    source's tree            source record       target record
    ------------  -------  -----------------------  ------------------  --------------------
    preflight     source   running                  outgoing: preflight incoming: claimed
    prepare/sync  source   running (offline:frozen) outgoing: prepare   (+SC page server)
    freeze, dump  source   frozen (cgroup freezer;  phase suspended     receiving (SC pages)
                           CRIU traces it during
                           the dump; post-copy:
                           frozen again at "ready")
    transfer      source   frozen                   outgoing: prepare   receiving
    restore       source   frozen                   (same)              undumped, never ran
    resume        target*  frozen                   resume-sent         SC: committed, then
                                                    (written before            thawed
                                                    "resume" is sent)   PC: pages, thawed
    pages (PC)    target*  frozen, CRIU serving     pages               pages ("receiving
                                                                        pages (N%)")
    commit        target   frozen                   -> forgotten, or    committed (durable
                                                    phase migrated      tombstone first)
                                                    to HOST
    (* post-copy: the target runs a provisional copy until its commit; stop-and-copy: the
    target owns it from its commit, which comes before it thaws)

When a side loses the other (end of stream, or nothing heard for DEAD_AFTER seconds, see
channel.py), or the user acts:

    stage         source loses target              target loses source   `pycpt migrate
                                                                         --abort CT` (source)
    ------------  -------------------------------  --------------------  --------------------
    before        roll back: end CRIU, bring the   remove everything     "not migrating" /
    resume-sent   network back, thaw               (an unrun copy too)   same as a loss
    resume-sent,  ask the target (the channel,     SC, not committed:    ask the target: its
    pages         then `migrate-target --abort     kill the unrun copy;  copy dead/absent ->
                  TOKEN` over ssh, for 2 x         committed: keep it.   resume here;
                  DEAD_AFTER): copy dead -> roll   PC: kill the copy     committed -> end the
                  back; committed -> end the copy  (never zero pages),   copy here, record
                  here; no answer -> stay frozen,  tombstone "aborted"   "migrated to HOST";
                  record stays: MigrationInDoubt-                        no answer -> refuse,
                  Error naming `pycpt migrate                            say what to check
                  --abort CT`                                            (--force resumes)
    committed     end the copy here                keep it (it owns it)  "migrated to HOST"

A killed command leaves its record: the next pycpt command on that container (any verb that
takes its lock, and `pycpt migrate --abort`) resolves it first by the rules above, before
doing anything else. On the target, `migrate-target --abort TOKEN CT` kills a live agent of
that migration, then answers from its tombstone: committed (rolling a committed copy forward
if the agent died before thawing it), or removes the uncommitted copy ("removed"), or says
"aborted" / "absent" (nothing of it is there, and it never committed). A committed copy that
died there behind pycpt's back before the source had ended its own (the target host crashed
right after its commit) is forgotten there and answered "lost": the source's frozen tree is
then all that is left of the container, and it resumes from its freeze (the run on the
target since "resume" is lost, as after a rollback). The agent itself never commits a copy
that is dead, and one that dies as it commits is forgotten the same way ("lost").
"""

from __future__ import annotations

from typing import Any, Dict

# The source's record of a migration (state["outgoing"]["stage"]), in order.
PREFLIGHT = "preflight"
PREPARE = "prepare"
RESUME_SENT = "resume-sent"
PAGES = "pages"
COMMITTED = "committed"  # the target owns it; the source's copy is being ended
SOURCE_STAGES = (PREFLIGHT, PREPARE, RESUME_SENT, PAGES, COMMITTED)

# The target's record (state["incoming"]["stage"]).
CLAIMED = "claimed"
RECEIVING = "receiving"
UNDUMPED = "undumped"
# PAGES: post-copy, resumed, provisional; COMMITTED: the tombstone says committed
TARGET_STAGES = (CLAIMED, RECEIVING, UNDUMPED, PAGES, COMMITTED)

# What `migrate-target --abort TOKEN CT` answers.
ANSWER_REMOVED = "removed"  # an uncommitted copy was there; it is gone now
ANSWER_ABORTED = "aborted"  # that migration was rolled back there already
ANSWER_ABSENT = "absent"  # nothing of that migration there, and it never committed
ANSWER_COMMITTED = "committed"  # the target owns the container
# it had committed, but its copy died there before the source ended its own (a crash of the
# target): the source's frozen tree is all that is left, and takes the container back
ANSWER_LOST = "lost"
ANSWERS = (ANSWER_REMOVED, ANSWER_ABORTED, ANSWER_ABSENT, ANSWER_COMMITTED, ANSWER_LOST)
COPY_DEAD = (ANSWER_REMOVED, ANSWER_ABORTED, ANSWER_ABSENT, ANSWER_LOST)


def target_may_own(outgoing: Dict[str, Any]) -> bool:
    """True once the source told the target to run the container: from then on only the
    target's answer (or the user's --force) may let the source's copy run again."""
    return outgoing.get("stage") in (RESUME_SENT, PAGES, COMMITTED)
