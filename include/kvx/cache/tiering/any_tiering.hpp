#pragma once
//! \file
//! `tiering::any_tiering`: a tiering policy whose choices are run-time
//! settings, for caches configured from JSON (`any_tiered_cache`) and for
//! tools that sweep policies.
//!
//! JSON (every field optional):
//! `{"mode": "write_back" | "write_through", "promote_on_hit": true, "demote_on_evict": true,
//!   "admission": "always" | "second_access", "doorkeeper_bits": 1048576}`
//! (`doorkeeper_bits`: 64 to 2^32, `second_access_admission::max_bits`).
//!
//! Thread safety: none (called under the cache's lock).
//!
//! \code
//! auto t = kvx::cache::tiering::any_tiering::from_config(view);  // result<any_tiering>
//! \endcode

#include <cstddef>
#include <optional>
#include <string>

#include <kvx/cache/tiering/second_access_admission.hpp>
#include <kvx/cache/tiering/write_back.hpp>
#include <kvx/cache/tiering_policy.hpp>
#include <kvx/core/config.hpp>
#include <kvx/core/result.hpp>

namespace kvx::cache::tiering {

struct tiering_settings {
  bool write_through = false;
  bool promote_on_hit = true;
  bool demote_on_evict = true;
  bool second_access = false;           //!< admission control: see second_access_admission.hpp
  std::size_t doorkeeper_bits = 1U << 20;
};

class any_tiering {
 public:
  using tiering_policy_concept = tiering_policy_tag;

  any_tiering() = default;
  explicit any_tiering(const tiering_settings& s) : s_(s) {
    if (s_.second_access) door_.emplace(s_.doorkeeper_bits);
  }

  //! Reads the settings from `v`; errors name the bad field.
  static result<any_tiering> from_config(const config::view& v) {
    KVX_TRY(v.allow_only({"mode", "promote_on_hit", "demote_on_evict", "admission", "doorkeeper_bits"}));
    tiering_settings s;
    auto mode = v.optional<std::string>("mode", "write_back");
    if (!mode) return mode.error();
    if (*mode == "write_through")
      s.write_through = true;
    else if (*mode != "write_back")
      return error{errc::invalid_argument, "config field '" + v.path_of("mode") + "': \"" + *mode +
                                               "\" is not a tiering mode (write_back, write_through)"};
    auto promote = v.optional<bool>("promote_on_hit", true);
    if (!promote) return promote.error();
    auto demote = v.optional<bool>("demote_on_evict", true);
    if (!demote) return demote.error();
    auto admission = v.optional<std::string>("admission", "always");
    if (!admission) return admission.error();
    if (*admission == "second_access")
      s.second_access = true;
    else if (*admission != "always")
      return error{errc::invalid_argument, "config field '" + v.path_of("admission") + "': \"" + *admission +
                                               "\" is not an admission policy (always, second_access)"};
    auto bits = v.optional<std::size_t>("doorkeeper_bits", std::size_t{1} << 20);
    if (!bits) return bits.error();
    using doorkeeper = second_access_admission<write_back>;
    if (*bits < 64 || *bits > doorkeeper::max_bits)
      return error{errc::invalid_argument, "config field '" + v.path_of("doorkeeper_bits") + "': " +
                                               std::to_string(*bits) + " is outside 64 to " +
                                               std::to_string(doorkeeper::max_bits) +
                                               " (2^32 bits, 512 MiB: 16 bits for each block of the largest tier)"};
    s.promote_on_hit = *promote;
    s.demote_on_evict = *demote;
    s.doorkeeper_bits = *bits;
    return any_tiering(s);
  }

  [[nodiscard]] bool writes_through() const noexcept { return s_.write_through; }
  [[nodiscard]] bool admit(const admission_context& a) { return door_ ? door_->admit(a) : true; }
  [[nodiscard]] bool promote_on_hit(std::size_t) const noexcept { return s_.promote_on_hit; }
  [[nodiscard]] bool demote_on_evict(std::size_t) const noexcept { return s_.demote_on_evict; }
  [[nodiscard]] const tiering_settings& settings() const noexcept { return s_; }

 private:
  tiering_settings s_{};
  std::optional<second_access_admission<write_back>> door_;
};

}  // namespace kvx::cache::tiering
