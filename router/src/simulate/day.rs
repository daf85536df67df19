//! The day of a region: the demand curve the demo's users follow, and
//! that `--assign edges=sun` weighs edges by.

/// Share of the peak demand at night.
pub const NIGHT_FLOOR: f64 = 0.0;

/// Local hour at which a region's demand starts.
pub const DAY_STARTS: f64 = 8.0;
/// Local hour by which it is gone.
pub const DAY_ENDS: f64 = 21.0;

/// Demand at local solar hour `h` as a share of the peak: zero at night,
/// rising from 8:00, peaking at midday and early afternoon, gone by 21:00.
pub fn daylight(h: f64) -> f64 {
    let h = h.rem_euclid(24.0);
    if !(DAY_STARTS..DAY_ENDS).contains(&h) {
        return NIGHT_FLOOR;
    }
    let x = std::f64::consts::PI * (h - DAY_STARTS) / (DAY_ENDS - DAY_STARTS);
    x.sin().powi(2).max(NIGHT_FLOOR)
}

/// Local solar hour at longitude `lon` when it is `utc` in Greenwich.
pub fn local_hour(utc: f64, lon: f64) -> f64 {
    (utc + lon / 15.0).rem_euclid(24.0)
}
