// The daemon's in-memory view of the catalog, for answering lookups, stat and readdir without
// touching SQLite, and for telling the FUSE layer what changed.
//
// Thread safety: all members may be called from any thread. Lock order: mu_ is a leaf; it is never
// held while calling out.
#pragma once

#include <cstdint>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <unordered_map>
#include <vector>

#include "core/options.hpp"
#include "meta/catalog.hpp"

namespace imagefs {

struct RegistryEvent {
    enum Kind { added, changed, removed };
    Kind kind;
    ImageRow row;     // the new row (or the last one known, for removed)
    State old_state;  // for changed and removed
};

// Whether a directory listing of the mount shows `row` under `-o list=MODE`: every image with
// list=all, only active ones with list=active. Lookups by name find every image either way.
bool shown_in_listing(const ImageRow& row, ListMode mode);

class Registry {
  public:
    // Replaces the whole view with a listing of the catalog; returns what changed. Rows with ids
    // above `max_id` were added after the listing and are kept. A row is only ever replaced by a
    // newer version (updated_at), and a removed id never comes back (ids are never reused), so a
    // listing read before a change cannot undo it.
    std::vector<RegistryEvent> sync(const std::vector<ImageRow>& rows, int64_t max_id);
    // Applies one row that was just written to the catalog.
    std::vector<RegistryEvent> update(const ImageRow& row);
    std::vector<RegistryEvent> remove(int64_t id);
    void set_progress(int64_t id, int64_t bytes);

    std::optional<ImageRow> by_id(int64_t id) const;
    std::optional<ImageRow> by_name(const std::string& name) const;
    std::vector<ImageRow> snapshot() const;  // ordered by id

  private:
    std::optional<RegistryEvent> apply_locked(const ImageRow& row);
    void unname_locked(const std::string& name, int64_t id);

    mutable std::mutex mu_;
    std::map<int64_t, ImageRow> rows_;
    std::unordered_map<std::string, int64_t> names_;
    std::set<int64_t> removed_;  // tombstones
};

}  // namespace imagefs
