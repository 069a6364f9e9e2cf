#pragma once
// A doubly linked list addressable by key: the building block of the
// list-ordered policies (LRU, S3-FIFO queues, ARC lists, SIEVE, ghosts).
// std::list keeps iterators stable across splices, so the index never needs
// fixing up when an entry moves; the index is a flat (open-addressing) map,
// one cache miss per lookup among a million keys.

#include <cstddef>
#include <cstdint>
#include <iterator>
#include <list>
#include <utility>

#include <kvx/cache/block_key.hpp>
#include <kvx/cache/detail/flat_key_map.hpp>

namespace kvx::cache::eviction::detail {

// Keys from traces are small integers (hi == 0); mix both halves so that a
// hash table never sees a clustered hash whatever the key source.
struct key_hash {
  [[nodiscard]] std::size_t operator()(const block_key& k) const noexcept {
    std::uint64_t x = k.lo ^ (k.hi * 0x9E3779B97F4A7C15ULL);
    x ^= x >> 33;
    x *= 0xFF51AFD7ED558CCDULL;
    x ^= x >> 33;
    return static_cast<std::size_t>(x);
  }
};

struct empty_value {};

// front = most recent / newest, back = oldest.
template <class T = empty_value>
class keyed_list {
 public:
  struct entry {
    block_key key;
    T value;
  };
  using iterator = typename std::list<entry>::iterator;

  [[nodiscard]] std::size_t size() const noexcept { return index_.size(); }
  [[nodiscard]] bool empty() const noexcept { return index_.empty(); }
  [[nodiscard]] bool contains(const block_key& k) const { return index_.count(k) != 0; }

  // nullptr if absent.
  [[nodiscard]] T* find(const block_key& k) {
    auto it = index_.find(k);
    return it == index_.end() ? nullptr : &it->second->value;
  }

  // end() if absent.
  [[nodiscard]] iterator locate(const block_key& k) {
    auto it = index_.find(k);
    return it == index_.end() ? list_.end() : it->second;
  }

  T& push_front(const block_key& k, T v = {}) {
    list_.push_front(entry{k, std::move(v)});
    index_.emplace(k, list_.begin());
    return list_.front().value;
  }

  void move_to_front(const block_key& k) {
    auto it = index_.find(k);
    if (it != index_.end()) list_.splice(list_.begin(), list_, it->second);
  }

  // Moves k from this list to the front of `to`, keeping its value.
  void transfer_front(const block_key& k, keyed_list& to) {
    auto it = index_.find(k);
    if (it == index_.end()) return;
    to.list_.splice(to.list_.begin(), list_, it->second);
    to.index_.emplace(k, it->second);
    index_.erase(it);
  }

  bool erase(const block_key& k) {
    auto it = index_.find(k);
    if (it == index_.end()) return false;
    list_.erase(it->second);
    index_.erase(it);
    return true;
  }

  entry pop_back() {
    entry e = std::move(list_.back());
    index_.erase(e.key);
    list_.pop_back();
    return e;
  }

  [[nodiscard]] entry& back() { return list_.back(); }
  [[nodiscard]] iterator begin() { return list_.begin(); }
  [[nodiscard]] iterator end() { return list_.end(); }

  // Oldest-first walk: the first key (from the back) with pred(key) true, or
  // end() if none.
  template <class Pred>
  [[nodiscard]] iterator find_oldest(Pred&& pred) {
    for (auto it = list_.rbegin(); it != list_.rend(); ++it)
      if (pred(it->key)) return std::prev(it.base());
    return list_.end();
  }

  void erase(iterator it) {
    index_.erase(it->key);
    list_.erase(it);
  }

  void clear() {
    list_.clear();
    index_.clear();
  }

 private:
  std::list<entry> list_;
  cache::detail::flat_key_map<iterator, key_hash> index_;
};

}  // namespace kvx::cache::eviction::detail
