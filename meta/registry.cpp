#include "meta/registry.hpp"

namespace imagefs {
namespace {

bool same(const ImageRow& a, const ImageRow& b) {
    return a.name == b.name && a.state == b.state && a.expected_size == b.expected_size &&
           a.final_size == b.final_size && a.last_error == b.last_error &&
           a.import_token == b.import_token && a.updated_at == b.updated_at && a.mode == b.mode &&
           a.uid == b.uid && a.gid == b.gid && a.mtime_ns == b.mtime_ns && a.xattrs == b.xattrs &&
           a.expected_sha256 == b.expected_sha256;
}

}  // namespace

bool shown_in_listing(const ImageRow& row, ListMode mode) {
    return mode == ListMode::all || row.state == State::active;
}

void Registry::unname_locked(const std::string& name, int64_t id) {
    auto it = names_.find(name);
    if (it != names_.end() && it->second == id) names_.erase(it);
}

std::optional<RegistryEvent> Registry::apply_locked(const ImageRow& row) {
    if (removed_.count(row.id)) return std::nullopt;
    auto it = rows_.find(row.id);
    if (it == rows_.end()) {
        rows_[row.id] = row;
        names_[row.name] = row.id;
        return RegistryEvent{RegistryEvent::added, row, row.state};
    }
    ImageRow old = it->second;
    // A row read earlier must not overwrite a newer one (sync and update race): updated_at grows
    // with every change of a row.
    if (row.updated_at <= old.updated_at) return std::nullopt;
    if (same(old, row)) {
        it->second = row;
        if (row.import_token == old.import_token)
            it->second.bytes_imported = std::max(old.bytes_imported, row.bytes_imported);
        return std::nullopt;
    }
    if (old.name != row.name) {
        unname_locked(old.name, row.id);
        names_[row.name] = row.id;
    }
    int64_t live = old.bytes_imported;
    it->second = row;
    if (row.state == State::importing && row.import_token == old.import_token)
        it->second.bytes_imported = std::max(live, row.bytes_imported);
    return RegistryEvent{RegistryEvent::changed, row, old.state};
}

std::vector<RegistryEvent> Registry::sync(const std::vector<ImageRow>& rows, int64_t max_id) {
    std::vector<RegistryEvent> events;
    std::lock_guard lk(mu_);
    std::map<int64_t, bool> seen;
    for (const auto& r : rows) {
        seen[r.id] = true;
        if (auto ev = apply_locked(r)) events.push_back(*ev);
    }
    for (auto it = rows_.begin(); it != rows_.end();) {
        if (seen.count(it->first) || it->first > max_id) {
            ++it;
            continue;
        }
        events.push_back({RegistryEvent::removed, it->second, it->second.state});
        unname_locked(it->second.name, it->first);
        removed_.insert(it->first);
        it = rows_.erase(it);
    }
    return events;
}

std::vector<RegistryEvent> Registry::update(const ImageRow& row) {
    std::lock_guard lk(mu_);
    if (auto ev = apply_locked(row)) return {*ev};
    return {};
}

std::vector<RegistryEvent> Registry::remove(int64_t id) {
    std::lock_guard lk(mu_);
    removed_.insert(id);
    auto it = rows_.find(id);
    if (it == rows_.end()) return {};
    RegistryEvent ev{RegistryEvent::removed, it->second, it->second.state};
    unname_locked(it->second.name, id);
    removed_.insert(id);
    rows_.erase(it);
    return {ev};
}

void Registry::set_progress(int64_t id, int64_t bytes) {
    std::lock_guard lk(mu_);
    auto it = rows_.find(id);
    if (it != rows_.end()) it->second.bytes_imported = bytes;
}

std::optional<ImageRow> Registry::by_id(int64_t id) const {
    std::lock_guard lk(mu_);
    auto it = rows_.find(id);
    if (it == rows_.end()) return std::nullopt;
    return it->second;
}

std::optional<ImageRow> Registry::by_name(const std::string& name) const {
    std::lock_guard lk(mu_);
    auto it = names_.find(name);
    if (it == names_.end()) return std::nullopt;
    return rows_.at(it->second);
}

std::vector<ImageRow> Registry::snapshot() const {
    std::lock_guard lk(mu_);
    std::vector<ImageRow> out;
    out.reserve(rows_.size());
    for (const auto& [id, r] : rows_) out.push_back(r);
    return out;
}

}  // namespace imagefs
