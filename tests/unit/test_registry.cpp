// meta/registry: the daemon's in-memory view of the catalog.
#include <algorithm>

#include "meta/registry.hpp"
#include "support.hpp"

using imagefs::ImageRow;
using imagefs::Registry;
using imagefs::RegistryEvent;
using imagefs::State;
using unit::dump;

namespace {

constexpr int64_t kAll = 1000;  // a listing that covers every id used here

ImageRow row(int64_t id, const std::string& name, State state = State::queued,
             int64_t updated_at = 1000, int64_t token = 0) {
    ImageRow r;
    r.id = id;
    r.name = name;
    r.source = "/src/" + name;
    r.state = state;
    r.created_at = 1000;
    r.updated_at = updated_at;
    r.import_token = token;
    return r;
}

std::string kind_name(RegistryEvent::Kind k) {
    switch (k) {
        case RegistryEvent::added:
            return "added";
        case RegistryEvent::changed:
            return "changed";
        case RegistryEvent::removed:
            return "removed";
    }
    return "?";
}

// "kind id name new-state old-state" per event, in order.
std::vector<std::string> describe(const std::vector<RegistryEvent>& evs) {
    std::vector<std::string> out;
    for (const auto& e : evs)
        out.push_back(kind_name(e.kind) + " " + std::to_string(e.row.id) + " " + e.row.name + " " +
                      std::string(imagefs::to_string(e.row.state)) + " " +
                      std::string(imagefs::to_string(e.old_state)));
    return out;
}

}  // namespace

TEST_CASE("registry: sync reports added changed and removed rows", "[registry]") {
    Registry reg;
    CHECK(reg.snapshot().empty());

    auto ev = reg.sync({row(2, "b"), row(1, "a")}, kAll);
    CHECK(describe(ev) ==
          std::vector<std::string>{"added 2 b queued queued", "added 1 a queued queued"});
    auto snap = reg.snapshot();
    REQUIRE(snap.size() == 2);
    CHECK(snap[0].id == 1);  // ordered by id
    CHECK(snap[1].id == 2);
    CHECK(reg.by_name("a")->id == 1);
    CHECK(reg.by_id(2)->name == "b");

    // The same rows again: nothing to report.
    CHECK(reg.sync({row(1, "a"), row(2, "b")}, kAll).empty());

    // a started importing, b was removed, c was added.
    ev = reg.sync({row(1, "a", State::importing, 2000, 1), row(3, "c")}, kAll);
    CHECK(describe(ev) == std::vector<std::string>{"changed 1 a importing queued",
                                                   "added 3 c queued queued",
                                                   "removed 2 b queued queued"});
    CHECK_FALSE(reg.by_id(2));
    CHECK_FALSE(reg.by_name("b"));
    CHECK(reg.by_id(1)->state == State::importing);
    CHECK(reg.by_id(1)->import_token == 1);
    CHECK(reg.by_name("c")->id == 3);
    CHECK(reg.snapshot().size() == 2);

    // The removed event carries the last known row.
    ev = reg.sync({row(3, "c")}, kAll);
    REQUIRE(ev.size() == 1);
    CHECK(ev[0].kind == RegistryEvent::removed);
    CHECK(ev[0].row.id == 1);
    CHECK(ev[0].row.state == State::importing);
    CHECK(ev[0].old_state == State::importing);

    // Everything gone.
    ev = reg.sync({}, kAll);
    CHECK(describe(ev) == std::vector<std::string>{"removed 3 c queued queued"});
    CHECK(reg.snapshot().empty());
}

TEST_CASE("registry: changes to sizes and errors are reported", "[registry]") {
    Registry reg;
    reg.sync({row(1, "a", State::importing, 1000, 1)}, kAll);

    ImageRow sized = row(1, "a", State::importing, 1001, 1);
    sized.expected_size = 4096;
    auto ev = reg.update(sized);
    CHECK(describe(ev) == std::vector<std::string>{"changed 1 a importing importing"});
    CHECK(reg.by_id(1)->expected_size == std::optional<int64_t>(4096));

    ImageRow failed = sized;
    failed.state = State::failed;
    failed.last_error = "boom";
    failed.updated_at = 1500;
    ev = reg.update(failed);
    CHECK(describe(ev) == std::vector<std::string>{"changed 1 a failed importing"});
    CHECK(reg.by_id(1)->last_error == std::optional<std::string>("boom"));

    // update() of an unknown row adds it.
    ev = reg.update(row(7, "new"));
    CHECK(describe(ev) == std::vector<std::string>{"added 7 new queued queued"});
    CHECK(reg.update(row(7, "new")).empty());
}

TEST_CASE("registry: stale rows are ignored", "[registry]") {
    Registry reg;
    ImageRow current = row(1, "a", State::importing, 2000, 1);
    current.bytes_imported = 10;
    reg.sync({current}, kAll);

    // A row read before the latest write: older updated_at, same token.
    ImageRow stale = row(1, "a", State::queued, 1000, 1);
    CHECK(reg.sync({stale}, kAll).empty());
    CHECK(dump(*reg.by_id(1)) == dump(current));  // not overwritten, not removed
    CHECK(reg.update(stale).empty());
    CHECK(dump(*reg.by_id(1)) == dump(current));

    // Older updated_at but an older token too: still stale.
    CHECK(reg.update(row(1, "a", State::failed, 1500, 0)).empty());
    CHECK(reg.by_id(1)->state == State::importing);

    // updated_at grows with every change of a row (the catalog makes it so), so a row with the
    // same updated_at is the same version: two writes in one millisecond cannot reorder.
    CHECK(reg.update(row(1, "a", State::verifying, 2000, 1)).empty());
    CHECK(reg.by_id(1)->state == State::importing);
    auto ev = reg.update(row(1, "a", State::verifying, 2001, 1));
    CHECK(describe(ev) == std::vector<std::string>{"changed 1 a verifying importing"});
}

TEST_CASE("registry: a listing read before a change cannot undo it", "[registry]") {
    Registry reg;
    reg.sync({row(1, "a"), row(2, "b")}, 2);
    // Row 3 was added after the listing below was read: it stays.
    reg.update(row(3, "c"));
    auto ev = reg.sync({row(1, "a"), row(2, "b")}, 2);
    CHECK(ev.empty());
    CHECK(reg.by_name("c"));
    // Row 2 was removed after the listing was read: it does not come back.
    CHECK(describe(reg.remove(2)) == std::vector<std::string>{"removed 2 b queued queued"});
    CHECK(reg.sync({row(1, "a"), row(2, "b")}, 2).empty());
    CHECK_FALSE(reg.by_name("b"));
    CHECK_FALSE(reg.by_id(2));
    // A later listing without row 3 does remove it.
    ev = reg.sync({row(1, "a")}, 3);
    CHECK(describe(ev) == std::vector<std::string>{"removed 3 c queued queued"});
}

TEST_CASE("registry: set_progress keeps the live byte count", "[registry]") {
    Registry reg;
    ImageRow r = row(1, "a", State::importing, 1000, 1);
    reg.sync({r}, kAll);
    reg.set_progress(1, 5000);
    CHECK(reg.by_id(1)->bytes_imported == 5000);
    CHECK(reg.by_name("a")->bytes_imported == 5000);

    // A resync with the catalog's older progress does not move the live count back.
    ImageRow flushed = r;
    flushed.bytes_imported = 4000;
    CHECK(reg.sync({flushed}, kAll).empty());
    CHECK(reg.by_id(1)->bytes_imported == 5000);

    // A progress flush with a newer timestamp, same attempt: still the larger live count.
    flushed.updated_at = 1100;
    reg.sync({flushed}, kAll);
    CHECK(reg.by_id(1)->bytes_imported == 5000);
    CHECK(reg.by_id(1)->updated_at == 1100);

    // A newer attempt starts from the catalog's count.
    ImageRow next = row(1, "a", State::importing, 1200, 2);
    next.bytes_imported = 0;
    reg.update(next);
    CHECK(reg.by_id(1)->bytes_imported == 0);

    // Progress of an unknown id is ignored.
    reg.set_progress(42, 1);
    CHECK_FALSE(reg.by_id(42));
    CHECK(reg.snapshot().size() == 1);
}

TEST_CASE("registry: by_name follows a rename", "[registry]") {
    Registry reg;
    reg.sync({row(1, "old"), row(2, "other")}, kAll);
    auto ev = reg.update(row(1, "new", State::queued, 2000));
    CHECK(describe(ev) == std::vector<std::string>{"changed 1 new queued queued"});
    REQUIRE(reg.by_name("new"));
    CHECK(reg.by_name("new")->id == 1);
    CHECK_FALSE(reg.by_name("old"));
    CHECK(reg.by_name("other")->id == 2);

    // Through sync as well.
    reg.sync({row(1, "newer", State::queued, 3000), row(2, "other")}, kAll);
    CHECK(reg.by_name("newer")->id == 1);
    CHECK_FALSE(reg.by_name("new"));
}

// Regression test. BUG in commit 35cc96e (meta/registry.cpp, Registry::sync, the removal loop's
// unconditional `names_.erase(it->second.name)`):
// when one sync both adds a row and removes another row that had the same name (`imagefs rm x`
// followed by `imagefs add x ...` between two syncs), the removal erases the name entry that the
// new row just registered, so by_name("x") finds nothing although by_id(new id) has the row. Later
// updates of that row never re-register the name (apply_locked only touches names_ on a rename),
// so ImageFs::lookup answers ENOENT for the image until the daemon restarts.
// Fix idea: erase a name only if names_[name] still maps to the id being removed/renamed.
TEST_CASE("registry: a name reused by a new row in the same sync stays reachable",
          "[registry][regression]") {
    Registry reg;
    reg.sync({row(1, "x", State::active, 1000, 1)}, kAll);
    auto ev = reg.sync({row(2, "x", State::queued, 2000, 0)}, kAll);
    CHECK(describe(ev) ==
          std::vector<std::string>{"added 2 x queued queued", "removed 1 x active active"});
    REQUIRE(reg.by_id(2));
    auto by_name = reg.by_name("x");
    CHECK(by_name.has_value());
    CHECK(by_name.value_or(ImageRow{}).id == 2);

    // And it stays reachable through later updates of the new row.
    reg.update(row(2, "x", State::importing, 3000, 1));
    reg.sync({row(2, "x", State::active, 4000, 1)}, kAll);
    CHECK(reg.by_name("x").has_value());
    CHECK(reg.by_name("x").value_or(ImageRow{}).id == 2);
}

// Regression test. BUG in commit 35cc96e (meta/registry.cpp, Registry::apply_locked, the
// unconditional `names_.erase(old.name)` on a rename): when two
// rows swap names in one sync, the second rename erases the entry the first one just wrote, so
// one of the two names is no longer found by by_name.
TEST_CASE("registry: two rows swapping names in one sync are both reachable",
          "[registry][regression]") {
    Registry reg;
    reg.sync({row(1, "x"), row(2, "y")}, kAll);
    reg.sync({row(1, "y", State::queued, 2000), row(2, "x", State::queued, 2000)}, kAll);
    REQUIRE(reg.by_name("x"));
    REQUIRE(reg.by_name("y"));
    CHECK(reg.by_name("x")->id == 2);
    CHECK(reg.by_name("y")->id == 1);
}

TEST_CASE("registry: list=active shows only active images, list=all shows every one",
          "[registry]") {
    using imagefs::ListMode;
    using imagefs::shown_in_listing;
    for (State s : {State::queued, State::importing, State::verifying, State::failed}) {
        INFO("state " << imagefs::to_string(s));
        CHECK_FALSE(shown_in_listing(row(1, "a", s), ListMode::active));
        CHECK(shown_in_listing(row(1, "a", s), ListMode::all));
    }
    CHECK(shown_in_listing(row(1, "a", State::active), ListMode::active));
    CHECK(shown_in_listing(row(1, "a", State::active), ListMode::all));
}
